"""`MemLongRetriever`: a LangChain retriever over one namespace of a :class:`memlong.MemoryBank`.

Contract: ``invoke(query)`` returns the ``k`` best chunks (ranked by its ``search_mode``, default the bank's; dense:
faiss inner product over the bank's embeddings) as ``Document`` s in rank order: ``page_content`` = the chunk text,
``metadata`` = the metadata copied onto the chunk at ingest time plus ``memlong_chunk_id``, ``memlong_doc_id``,
``memlong_namespace`` and ``memlong_score``; ``Document.id`` = the chunk id. Feed them to :class:`ChatMemLong` as K-V
with ``memlong_chunk_ids_from_documents(docs)`` (or :func:`create_memlong_rag_chain`). ``k`` is a field and an
``invoke`` keyword. An empty or unknown namespace gives ``[]``.

Example:
    >>> retriever = MemLongRetriever(bank=ml.bank, namespace="hamlet", k=4)
    >>> docs = retriever.invoke("the ghost on the battlements")
    >>> docs[0].metadata["memlong_chunk_id"]
    '3f9c...'
    >>> retriever.invoke("Ophelia", k=1)
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from memlong import MemLong, MemoryBank
from memlong.upsert import RESERVED_PREFIXES
from memlong_integrations.metadata import CHUNK_ID_KEY, DOC_ID_KEY, NAMESPACE_KEY, SCORE_KEY

__all__ = ["CHUNK_ID_KEY", "MemLongRetriever", "chunk_document"]

TEXT_KEY = "_memlong_text"  # a vector-store entry's page_content, kept once, on its first chunk


def chunk_document(bank: MemoryBank, chunk_id: str, namespace: str, score: float | None = None) -> Document:
    """The ``Document`` of one stored chunk (metadata carries its chunk id)."""
    chunk = bank.get(chunk_id, namespace=namespace)
    metadata = {k: v for k, v in chunk.metadata.items() if not k.startswith(RESERVED_PREFIXES)}  # memlong's own
    metadata.update({CHUNK_ID_KEY: chunk.id, DOC_ID_KEY: chunk.doc_id, NAMESPACE_KEY: namespace})
    if score is not None:
        metadata[SCORE_KEY] = score
    return Document(page_content=chunk.text, metadata=metadata, id=chunk.id)


class MemLongRetriever(BaseRetriever):
    """Retrieve chunks of a MemLong memory bank as Documents that carry their chunk id.

    Setup:
        Ingest documents with ``MemLong.ingest`` or ``MemLongVectorStore.add_documents``.

    Instantiate:
        .. code-block:: python

            retriever = MemLongRetriever(bank=ml.bank, namespace="docs", k=4)
            retriever = MemLongRetriever(bank=ml.bank, namespace="docs", k=1, search_mode="hybrid")
            # or: MemLongRetriever.from_memlong(ml, namespace="docs")

    Invoke:
        .. code-block:: python

            docs = retriever.invoke("who keeps the iron key?")
            docs = retriever.invoke("who keeps the iron key?", k=2)
            ids = [d.metadata["memlong_chunk_id"] for d in docs]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    bank: MemoryBank = Field(exclude=True)
    """The memory bank to search (``MemLong.bank``)."""
    namespace: str = "default"
    """Namespace to search."""
    k: int = 4
    """Chunks returned per query (an ``invoke`` keyword ``k`` overrides it)."""
    count_retrievals: bool = True
    """Bump the chunks' retrieval counters (they decide eviction, as in the paper)."""
    search_mode: Literal["dense", "lexical", "hybrid"] | None = None
    """``"dense"`` (embeddings), ``"lexical"`` (BM25) or ``"hybrid"`` (both, reciprocal rank fusion); ``None``:
    the bank's ``search_mode`` (``MemLongConfig.search_mode``). ``memlong_score`` is the chosen ranking's score."""

    @classmethod
    def from_memlong(cls, memlong: MemLong, **kwargs: Any) -> MemLongRetriever:
        """A retriever over ``memlong.bank``; ``k`` defaults to the model's ``top_k``."""
        kwargs.setdefault("k", memlong.config.top_k)
        return cls(bank=memlong.bank, **kwargs)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, **kwargs: Any) -> list[Document]:
        if kwargs:
            raise TypeError(f"MemLongRetriever.invoke takes k only, not {sorted(kwargs)}. To filter by metadata, "
                            "search a MemLongVectorStore: store.as_retriever(search_kwargs={'filter': {...}}).")
        k = self.k if k is None else k  # the bank checks it (an integer >= 0)
        if not isinstance(query, str) or not query.strip():
            raise ValueError("The query is empty: give the retriever some text to search for.")
        with self.bank.reading():  # a hit deleted by another thread before it is read: never
            hits = self.bank.search(query, namespace=self.namespace, k=k, count=self.count_retrievals,
                                    mode=self.search_mode)
            return [chunk_document(self.bank, h.chunk_id, self.namespace, h.score) for h in hits]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None, **kwargs: Any) -> list[Document]:
        """As :meth:`_get_relevant_documents` (``ainvoke(q, k=2)`` too), in a worker thread."""
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync(), k=k,
                                       **kwargs)
