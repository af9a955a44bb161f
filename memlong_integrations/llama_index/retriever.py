"""`MemLongRetriever`: a LlamaIndex ``BaseRetriever`` straight over a MemLong memory bank.

It returns one ``NodeWithScore`` per bank chunk. The chunk id is the node id and sits in the node's metadata
(``memlong_chunk_id``, with ``memlong_namespace``), excluded from the LLM and embedding text: a stock text
synthesizer shows the model only the chunk text, while :class:`MemLongSynthesizer` hands the ids to
:class:`MemLongLLM`, which attends to the chunks' stored K-V. Same nodes as
``VectorStoreIndex(...over MemLongVectorStore).as_retriever()``, without building an index object.

Example:
    >>> retriever = MemLongRetriever(ml, namespace="plays", similarity_top_k=4)
    >>> hits = retriever.retrieve("What is the password of the iron key?")
    >>> [h.node.metadata["memlong_chunk_id"] for h in hits]
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters, VectorStoreQuery, VectorStoreQueryMode

from memlong import MemLong
from memlong_integrations.llama_index.vector_store import MemLongVectorStore

__all__ = ["MemLongRetriever"]


class MemLongRetriever(BaseRetriever):
    """Top-k chunks of one bank namespace for a query, as nodes carrying their chunk ids.

    Args:
        memlong: the model whose bank to search.
        namespace: the namespace to search.
        similarity_top_k: chunks per query (default: the model's ``top_k``).
        filters: exact-match metadata filters (see :func:`~memlong_integrations.llama_index.vector_store.matches`).
        raise_on_empty: an empty namespace raises ``ValueError`` instead of returning no nodes.
        vector_store_query_mode: as in ``index.as_retriever``: ``"default"`` (the bank's ``search_mode``),
            ``"hybrid"`` (BM25 + embeddings, reciprocal rank fusion), ``"text_search"`` / ``"sparse"`` (BM25).

    Example:
        >>> MemLongRetriever(ml, namespace="plays", similarity_top_k=1, vector_store_query_mode="hybrid")
    """

    def __init__(self, memlong: MemLong, *, namespace: str = "default", similarity_top_k: int | None = None,
                 filters: MetadataFilters | None = None, raise_on_empty: bool = True,
                 vector_store_query_mode: str | VectorStoreQueryMode = VectorStoreQueryMode.DEFAULT, **kwargs: Any) -> None:
        self._store = MemLongVectorStore(memlong, namespace=namespace, raise_on_empty=raise_on_empty)
        self._top_k = memlong.config.top_k if similarity_top_k is None else int(similarity_top_k)
        if self._top_k <= 0:
            raise ValueError(f"similarity_top_k must be a positive number of chunks, got {self._top_k}.")
        self._filters = filters
        try:
            self._mode = VectorStoreQueryMode(vector_store_query_mode)
        except ValueError:
            raise ValueError(f"vector_store_query_mode {vector_store_query_mode!r} is not a LlamaIndex query mode; "
                             "use 'default', 'hybrid', 'text_search' or 'sparse'.") from None
        super().__init__(**kwargs)

    @property
    def namespace(self) -> str:
        return self._store.namespace

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        result = self._store.query(VectorStoreQuery(query_str=query_bundle.query_str, similarity_top_k=self._top_k,
                                                    filters=self._filters, mode=self._mode))
        return [NodeWithScore(node=node, score=score) for node, score in zip(result.nodes, result.similarities)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)
