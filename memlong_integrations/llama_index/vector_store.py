"""`MemLongVectorStore`: a LlamaIndex vector store whose storage is one namespace of a MemLong memory bank.

Contract:
    * ``add(nodes)`` streams every node's text through ``MemLong.ingest`` (one progress bar for the batch), so
      each node becomes one or more ``chunk_size``-token bank chunks with their K-V computed at insert time.
      Every chunk keeps the node's metadata plus ``memlong_node_id`` / ``memlong_ref_doc_id``; ``add`` returns
      the node ids, and adding a node id the store holds replaces that node. Each node is streamed on its own
      (its K-V sees the node's own preceding text); to give the K-V a whole document's context, pass the
      documents as the nodes: ``VectorStoreIndex(documents, ...)``
      (``from_documents(..., transformations=[])`` still splits: LlamaIndex treats ``[]`` as "the default").
    * ``query`` searches the bank with its own embedder and ``query.query_str`` (``is_embedding_query=False``:
      LlamaIndex does not embed the query), so retrieval is the bank's retrieval whatever embed model the index
      was given. It returns one node per chunk: ``node.id_`` = chunk id, ``metadata["memlong_chunk_id"]`` too
      (hidden from LLM and embedding text), the id the node was added with in ``metadata["memlong_node_id"]``
      (chunk ids, because a node longer than a chunk is several chunks and LlamaIndex keeps one node per id in a
      result), the ref doc as the SOURCE relationship.
    * ``delete(ref_doc_id)`` removes every chunk of that document (``MemoryBank.delete(doc_id=...)``);
      ``delete_nodes`` takes chunk ids or the node ids ``add`` returned, and/or filters.
    * Filters: ``==``, ``!=``, ``in``, ``nin`` on metadata, combined with ``and`` / ``or`` / ``not`` (nested
      ``MetadataFilters`` too); other operators raise ``ValueError``. ``doc_ids`` / ``node_ids`` restrict too.
    * ``persist`` (``index.storage_context.persist(DIR)``) saves the namespace with ``MemLong.save_memory`` beside
      LlamaIndex's files; :meth:`MemLongVectorStore.from_persist_dir` loads it back.
    * Querying an empty namespace raises ``ValueError`` (nothing was ingested, or everything was deleted) unless
      ``raise_on_empty=False``; a filter that matches nothing returns no nodes.

Example:
    >>> from llama_index.core import Document, StorageContext, VectorStoreIndex
    >>> store = MemLongVectorStore(ml, namespace="plays")
    >>> index = VectorStoreIndex.from_documents(
    ...     [Document(text=hamlet, metadata={"play": "hamlet"})],
    ...     storage_context=StorageContext.from_defaults(vector_store=store),
    ...     embed_model=MemLongEmbedding.from_memlong(ml))
    >>> nodes = index.as_retriever(similarity_top_k=4).retrieve("Who is Ophelia?")
    >>> nodes[0].node.metadata["memlong_chunk_id"] == nodes[0].node.node_id
    True
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.schema import BaseNode, Document, MetadataMode
from llama_index.core.storage.storage_context import NAMESPACE_SEP, VECTOR_STORE_FNAME
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)

from memlong import MemLong, PromptTooLongError
from memlong.records import check_count
from memlong.upsert import check_user_metadata, entry_lock, ingest_replacing
from memlong_integrations._threads import in_thread
from memlong_integrations.llama_index._common import (
    EXCLUDED_KEY,
    NODE_ID_KEY,
    REF_DOC_ID_KEY,
    checked_memlong,
    chunk_node,
    user_metadata,
)

__all__ = ["MemLongVectorStore", "matches", "memory_folder"]

_SUPPORTED = (FilterOperator.EQ, FilterOperator.NE, FilterOperator.IN, FilterOperator.NIN)
_MISSING = object()


def matches(metadata: dict[str, Any], filters: MetadataFilters | None) -> bool:
    """Whether ``metadata`` passes ``filters`` (exact match: ``==``, ``!=``, ``in``, ``nin``; and/or/not).

    Raises:
        ValueError: an operator other than the four above.
    """
    if filters is None or not filters.filters:
        return True
    results = []
    for f in filters.filters:
        if isinstance(f, MetadataFilters):
            results.append(matches(metadata, f))
            continue
        if f.operator not in _SUPPORTED:
            names = ", ".join(o.value for o in _SUPPORTED)
            raise ValueError(f"MemLongVectorStore supports exact-match filters only ({names}); got "
                             f"{f.operator.value!r} on key {f.key!r}. Filter the retrieved nodes afterwards instead.")
        value = metadata.get(f.key, _MISSING)
        if f.operator == FilterOperator.EQ:
            results.append(value == f.value)
        elif f.operator == FilterOperator.NE:
            results.append(value != f.value)
        else:
            allowed = f.value if isinstance(f.value, list) else [f.value]
            results.append((value in allowed) == (f.operator == FilterOperator.IN))
    condition = filters.condition or FilterCondition.AND
    if condition == FilterCondition.OR:
        return any(results)
    if condition == FilterCondition.NOT:
        return not any(results)
    return all(results)



def memory_folder(persist_path: str) -> Path:
    """Where :meth:`MemLongVectorStore.persist` saves the memory for LlamaIndex's ``persist_path``:
    ``DIR/default__vector_store.json`` -> ``DIR/default__vector_store.memlong``."""
    return Path(persist_path).with_suffix(".memlong")


def _empty_marker(folder: Path) -> Path:
    """The file :meth:`MemLongVectorStore.persist` writes instead of ``folder`` for an empty store."""
    return folder.with_name(folder.name + ".empty")


def _local(what: str, fs: Any) -> None:
    if fs is not None and "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise NotImplementedError(f"MemLongVectorStore.{what} works on the local file system only (MemLong memory "
                                  "is safetensors + JSON in a folder); give no fs.")


class MemLongVectorStore(BasePydanticVectorStore):
    """One namespace of a MemLong memory bank as a LlamaIndex vector store (text, embeddings and K-V).

    Args:
        memlong: the model whose bank stores the chunks (K-V is computed with it at insert time).
        namespace: the bank namespace (one per document set, user or session).
        raise_on_empty: ``query`` on an empty namespace raises ``ValueError`` (else returns no nodes).
        show_progress: progress bar while ingesting.
        chunk_context: ``"chunk"`` (default): each chunk's K-V computed from the chunk alone, as pasting it
            into a prompt would; ``"document"``: inside its document's sliding window (``MemLong.ingest``).
            With ``"chunk"`` a chunk's text is stored without surrounding whitespace and its K-V are computed
            from exactly that text (``MemLong.ingest(strip=True)``): LlamaIndex's synthesizers strip every
            chunk they paste, so the stock text pipeline then encodes the same tokens the K-V hold.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # a misspelt option is an error
    stores_text: bool = True
    is_embedding_query: bool = False  # the bank embeds query_str with its own embedder
    flat_metadata: bool = False
    namespace: str = Field(default="default", description="Memory bank namespace.")
    raise_on_empty: bool = Field(default=True, description="Raise when querying an empty namespace.")
    show_progress: bool = Field(default=True, description="Progress bar while ingesting.")
    chunk_context: Literal["chunk", "document"] = Field(
        default="chunk", description="K-V of each chunk computed from the chunk alone ('chunk', as pasting it would) "
                                     "or inside its document's window ('document'); see MemLong.ingest(context=).")

    _memlong: MemLong = PrivateAttr()

    def __init__(self, memlong: MemLong, **kwargs: Any) -> None:
        memlong = checked_memlong("MemLongVectorStore", memlong)  # the node parser counts tokens with tiktoken
        super().__init__(**kwargs)
        self._memlong = memlong

    @classmethod
    def class_name(cls) -> str:
        return "MemLongVectorStore"

    @property
    def client(self) -> MemLong:
        """The wrapped :class:`memlong.MemLong` (``client.bank`` is the memory bank)."""
        return self._memlong

    @property
    def memlong(self) -> MemLong:
        return self._memlong

    # ------------------------------------------------------------------ writing
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Ingest ``nodes`` into the bank (chunk K-V computed now); returns their node ids. A node id added again
        replaces that node; a node without text is not stored (nothing to compute K-V of), but still replaces it.

        Raises:
            ValueError: a node's metadata key that memlong reserves (``memlong_*``, ``_memlong*``; the keys this
                store itself adds to retrieved nodes are dropped, not refused). Nothing is added.
        """
        texts, doc_ids, metadatas = [], [], []
        for node in nodes:
            text = node.get_content(metadata_mode=MetadataMode.NONE)
            if not text.strip():
                continue  # nothing to compute K-V of or retrieve by
            ref = node.ref_doc_id or (node.node_id if isinstance(node, Document) else None) or node.node_id
            texts.append(text)
            doc_ids.append(str(ref))
            metadatas.append({**check_user_metadata(user_metadata(node.metadata), f"node {node.node_id!r} metadata"),
                              NODE_ID_KEY: node.node_id, REF_DOC_ID_KEY: str(ref),
                              EXCLUDED_KEY: {"llm": list(node.excluded_llm_metadata_keys),
                                             "embed": list(node.excluded_embed_metadata_keys)}})
        incoming = [node.node_id for node in nodes]
        if not texts and incoming:  # blank nodes only: their earlier versions go all the same (they stayed)
            self.delete_nodes(node_ids=incoming)
        elif texts:  # one add, replacing the chunks of nodes with these ids (as SimpleVectorStore replaces a node)
            ingest_replacing(self._memlong, texts, namespace=self.namespace, doc_ids=doc_ids, metadatas=metadatas,
                             replace=lambda: self._select(node_ids=incoming), progress=self.show_progress,
                             context=self.chunk_context, strip=self.chunk_context == "chunk")
        return [node.node_id for node in nodes]

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        return await in_thread(self.add, nodes, **kwargs)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Remove every chunk of document ``ref_doc_id`` (no error if it has none)."""
        with entry_lock(self._memlong.bank, self.namespace):
            if self.namespace in self._memlong.bank.namespaces():
                self._memlong.bank.delete(namespace=self.namespace, doc_id=str(ref_doc_id))

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete, ref_doc_id)

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        """Remove chunks by chunk id or ingested node id, and/or by filters (both given: chunks matching both)."""
        with entry_lock(self._memlong.bank, self.namespace):
            drop = self._select(node_ids=node_ids, filters=filters)
            if drop:
                self._memlong.bank.delete(drop, namespace=self.namespace)

    async def adelete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                            **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete_nodes, node_ids, filters)

    def clear(self) -> None:
        """Forget the whole namespace."""
        with entry_lock(self._memlong.bank, self.namespace):
            self._memlong.bank.reset(self.namespace)

    async def aclear(self) -> None:
        self.clear()

    # ------------------------------------------------------------------ saving
    def persist(self, persist_path: str, fs: Any = None) -> None:
        """Save the namespace's chunks (text, embeddings, K-V, metadata) with :meth:`MemLong.save_memory` to the
        folder :func:`memory_folder` names beside ``persist_path``: ``index.storage_context.persist(DIR)`` calls
        this, and :meth:`from_persist_dir` reads it back. Atomic: a save that dies midway leaves the previous one.
        An empty namespace removes an earlier save there, as LlamaIndex's own stores overwrite theirs, and leaves
        ``<folder>.empty`` naming the namespace, so that :meth:`from_persist_dir` reloads an emptied index as empty.

        Raises:
            NotImplementedError: ``fs`` is not the local file system.
        """
        _local("persist", fs)
        folder = memory_folder(persist_path)
        empty = _empty_marker(folder)
        if self._memlong.bank.num_tokens(self.namespace):
            self._memlong.save_memory(folder, namespaces=[self.namespace])
            empty.unlink(missing_ok=True)
        else:
            empty.write_text(json.dumps({"namespace": self.namespace}), encoding="utf-8")
            if folder.is_dir():
                shutil.rmtree(folder)

    @classmethod
    def from_persist_dir(cls, persist_dir: str, memlong: MemLong, *, vector_store_name: str = "default",
                         fs: Any = None, **kwargs: Any) -> MemLongVectorStore:
        """The store ``index.storage_context.persist(persist_dir)`` saved, its namespace loaded into ``memlong``'s
        bank (same-named namespaces there are replaced, others kept); ``kwargs`` as the constructor's. The saved
        namespace is used unless ``namespace=`` names it: a service that loads folders its users upload passes
        ``namespace=`` (the user's own), so that no file can replace or empty another namespace.

        Example:
            >>> index.storage_context.persist("index")                          # writes index/ and its memory
            >>> store = MemLongVectorStore.from_persist_dir("index", ml)
            >>> index = load_index_from_storage(StorageContext.from_defaults(vector_store=store, persist_dir="index"),
            ...                                 embed_model=MemLongEmbedding.from_memlong(ml))

        Raises:
            FileNotFoundError: no MemLong memory was saved there (named, with how to make one).
            memlong.MemoryMismatchError: the memory was made by another model, config or embedder.
            ValueError: ``namespace`` given and not the one saved (the saved one is named).
            memlong.MemoryFileError: the memory holds several namespaces (``persist`` writes one).
        """
        _local("from_persist_dir", fs)
        folder = memory_folder(os.path.join(persist_dir, f"{vector_store_name}{NAMESPACE_SEP}{VECTOR_STORE_FNAME}"))
        if not folder.is_dir() and _empty_marker(folder).is_file():  # an index saved empty: reloads empty
            saved = json.loads(_empty_marker(folder).read_text(encoding="utf-8"))["namespace"]
            if kwargs.setdefault("namespace", saved) != saved:
                raise ValueError(f"The index at {persist_dir!r} was saved from namespace {saved!r} (empty), not "
                                 f"{kwargs['namespace']!r}; leave namespace out, or give {saved!r}. Nothing was loaded.")
            memlong.bank.reset(saved)  # as a load replaces the namespace with what was saved
            return cls(memlong, **kwargs)
        if not folder.is_dir():
            raise FileNotFoundError(f"No MemLong memory at {str(folder)!r}: save the index with "
                                    "index.storage_context.persist(DIR) from an index over a MemLongVectorStore that "
                                    "holds chunks (an empty store saves none).")
        # one namespace, as persist() writes: a file of several would replace namespaces other stores use
        loaded = memlong.bank.restore(folder, namespaces=[kwargs["namespace"]] if "namespace" in kwargs else None,
                                      fingerprint=memlong.memory_fingerprint(), single=True)
        kwargs.setdefault("namespace", loaded[0])
        return cls(memlong, **kwargs)

    # ------------------------------------------------------------------ reading
    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Chunks (as nodes) by chunk id or ingested node id, and/or filters; all chunks when neither is given."""
        with self._memlong.bank.reading():  # a chunk another thread deletes meanwhile: listed and read, or neither
            return [chunk_node(self._memlong.bank, cid, self.namespace).node
                    for cid in self._select(node_ids=node_ids, filters=filters, everything=True)]

    async def aget_nodes(self, node_ids: list[str] | None = None,
                         filters: MetadataFilters | None = None) -> list[BaseNode]:
        return self.get_nodes(node_ids, filters)

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Top ``similarity_top_k`` chunks for ``query.query_str`` among those passing filters / ids."""
        modes = {VectorStoreQueryMode.DEFAULT: None, VectorStoreQueryMode.HYBRID: "hybrid",
                 VectorStoreQueryMode.TEXT_SEARCH: "lexical", VectorStoreQueryMode.SPARSE: "lexical"}
        if query.mode not in modes:
            raise ValueError(f"MemLongVectorStore supports the query modes default (the bank's search_mode), hybrid, "
                             f"text_search and sparse (BM25), not {query.mode.value!r}.")
        mode = modes[query.mode]
        top_k = check_count(query.similarity_top_k, "similarity_top_k")  # named as the user set it
        if mode == "hybrid" and query.alpha is not None:  # LlamaIndex: 0 = BM25 only, 1 = embeddings only
            if query.alpha not in (0, 0.5, 1):
                raise ValueError(f"alpha={query.alpha!r}: MemLongVectorStore fuses its hybrid rankings by reciprocal "
                                 "rank with equal weights, so alpha takes 0 (BM25 only), 1 (embeddings only), 0.5 "
                                 "or None (both, fused).")
            mode = {0: "lexical", 1: "dense"}.get(query.alpha, mode)
        bank = self._memlong.bank
        with bank.reading():  # one state: a chunk written or deleted meanwhile (another thread) is never half-seen
            if not bank.num_chunks(self.namespace):  # (not chunk_ids: that sorted the namespace on every query)
                if self.raise_on_empty:
                    raise ValueError(f"The memory namespace {self.namespace!r} is empty: nothing was ingested (or every "
                                     "document was deleted), so there is nothing to retrieve. Build the index first, e.g. "
                                     "VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults("
                                     "vector_store=store), embed_model=MemLongEmbedding.from_memlong(ml)); an index saved "
                                     "with index.storage_context.persist(DIR) is reloaded with "
                                     "MemLongVectorStore.from_persist_dir(DIR, ml).")
                return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
            restricted = bool(query.filters and query.filters.filters) or bool(query.node_ids) or bool(query.doc_ids)
            allowed = set(self._select(node_ids=query.node_ids, doc_ids=query.doc_ids, filters=query.filters,
                                       everything=True)) if restricted else None
            if query.query_str is not None and not query.query_str.strip():
                raise ValueError("The question is empty: give the query engine or retriever some text to search for.")
            if query.query_str:
                probe: Any = query.query_str
                try:  # the question must fit the model's local window: say so here, before LlamaIndex packs a prompt
                    self._memlong.encode_prompt(query.query_str)
                except PromptTooLongError as error:
                    raise PromptTooLongError(f"The question is too long for this model. {error}", error.tokens,
                                             error.window) from None
            elif mode is None and query.query_embedding is not None and len(query.query_embedding) == bank.embedder.dim:
                probe, mode = query.query_embedding, "dense"
            else:
                raise ValueError("MemLongVectorStore needs query.query_str (it embeds queries with the bank's embedder, "
                                 "and lexical or hybrid search match its words).")
            exclude = [] if allowed is None else [cid for cid in bank.chunk_ids(self.namespace) if cid not in allowed]
            hits = bank.search(probe, namespace=self.namespace, k=top_k, exclude=exclude, mode=mode)
            nodes = [chunk_node(bank, h.chunk_id, self.namespace, h.score).node for h in hits]
            return VectorStoreQueryResult(nodes=nodes, similarities=[h.score for h in hits], ids=[h.chunk_id for h in hits])

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        return await asyncio.to_thread(self.query, query, **kwargs)

    # ------------------------------------------------------------------ internals
    def _select(self, *, node_ids: list[str] | None = None, doc_ids: list[str] | None = None,
                filters: MetadataFilters | None = None, everything: bool = False) -> list[str]:
        """Chunk ids of the namespace matching ids (chunk or node), doc ids and filters (all that are given)."""
        bank = self._memlong.bank
        if not (node_ids or doc_ids or (filters and filters.filters)) and not everything:
            return []
        ids = set(node_ids or ())
        docs = set(map(str, doc_ids or ()))
        selected = []
        for chunk in bank.chunks(self.namespace):  # one read: a delete in another thread cannot cut the loop
            cid = chunk.id
            if ids and cid not in ids and chunk.metadata.get(NODE_ID_KEY) not in ids:
                continue
            if docs and chunk.doc_id not in docs:
                continue
            if not matches(chunk.metadata, filters):
                continue
            selected.append(cid)
        return selected

