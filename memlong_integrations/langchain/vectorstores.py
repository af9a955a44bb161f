"""`MemLongVectorStore`: a LangChain vector store whose entries live in a :class:`memlong.MemoryBank` as K-V.

Contract:
    * An entry is one LangChain ``Document``. ``add_texts`` / ``add_documents`` stream each entry through
      ``MemLong.ingest(..., doc_ids=[entry id], metadatas=[...])``: the entry becomes one or more chunks of
      ``chunk_size`` tokens, each with its embedding and the K-V the model computed for it. The entry id is the
      chunks' ``doc_id``; ids you pass (or ``Document.id``) round-trip unchanged, others are new UUIDs.
    * Adding an id that exists replaces that entry (upsert): the new chunks are written first, then the old ones
      deleted, so a failed add loses nothing.
    * Searches rank chunks and return each entry once (score = its best chunk's cosine similarity), as the
      ``Document`` you stored: same ``page_content``, ``metadata`` and ``id``. All of an entry's chunks reach
      :class:`ChatMemLong` as K-V through :meth:`chunk_ids` / :func:`memlong_chunk_ids_from_documents`. For
      chunk-level hits over long documents use :class:`MemLongRetriever`.
    * Searches take ``filter=``: a dict (every key equal in the entry's metadata; ``$``-operators such as
      ``{"year": {"$gt": 2004}}`` are refused, not matched against) or a callable over the
      ``Document``, as LangChain's ``InMemoryVectorStore`` (it runs while the bank is held still for the search:
      it must not change the bank, RuntimeError); ``max_marginal_relevance_search`` (and ``..._by_vector``,
      their async forms, ``as_retriever(search_type="mmr")``) pick diverse entries the same way it does.
    * ``delete(ids)`` ignores ids that are not there (LangChain's contract) and returns True (none is stored now);
      ``get_by_ids`` returns the entries that exist. The bank's own embedder is used (no ``Embeddings`` object);
      a search bumps the retrieval counter (which eviction reads) of each returned entry's best chunk.

Example:
    >>> store = MemLongVectorStore(memlong=ml, namespace="docs")
    >>> ids = store.add_documents([Document("The password of the harbour gate is marigold.", id="gate")])
    >>> store.similarity_search("harbour gate password", k=1)
    [Document(id='gate', metadata={}, page_content='The password of the harbour gate is marigold.')]
    >>> store.chunk_ids(store.similarity_search("harbour gate password", k=1))   # -> ChatMemLong(memlong_chunk_ids=...)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from memlong import MemLong
from memlong.memory import query_vector
from memlong.records import check_count
from memlong.upsert import RESERVED_PREFIXES, check_user_metadata, entry_lock, ingest_entries
from memlong_integrations._threads import in_thread

from ._common import memlong_chunk_ids_from_documents
from .retrievers import TEXT_KEY

__all__ = ["MemLongVectorStore"]

MetadataFilter: TypeAlias = Mapping[str, Any] | Callable[[Document], bool]


def _filter_fn(filter: MetadataFilter | None) -> Callable[[Document], bool] | None:  # noqa: A002
    """A predicate over Documents: a callable as is; a dict = every key present in the metadata with that value."""
    if filter is None or callable(filter):
        return filter
    if isinstance(filter, Mapping):
        operator = _operator_in(filter)
        if operator is not None:  # a Chroma / PGVector-style filter matched nothing here, silently
            raise ValueError(f"filter uses the operator {operator!r}: this store's dict filter matches metadata "
                             "values exactly ({'topic': 'tower'}); for comparisons pass a callable taking a Document, "
                             "e.g. filter=lambda doc: doc.metadata.get('year', 0) > 2004.")
        wanted = {key: _as_stored(value) for key, value in filter.items()}  # (1, 2) finds the stored [1, 2]
        missing = object()
        return lambda doc: all(doc.metadata.get(key, missing) == value for key, value in wanted.items())
    raise TypeError(f"filter must be a dict of metadata values or a callable taking a Document, got "
                    f"{type(filter).__name__}.")


_OPERATORS = frozenset(f"${op}" for op in ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "and", "or", "not",
                                          "nor", "exists", "like", "ilike", "contains", "between", "all", "size"))


def _operator_in(filter: Mapping[str, Any]) -> str | None:  # noqa: A002
    """The first query operator a dict filter uses (``{"$and": [...]}``, ``{"year": {"$gt": 2004}}``), or None
    (other ``$`` keys, e.g. a stored ``{"$ref": ...}``, are values compared as stored)."""
    for key, value in filter.items():
        if key in _OPERATORS:
            return key
        if isinstance(value, Mapping) and value and all(k in _OPERATORS for k in value):
            return next(iter(value))
    return None


_SEARCH = "k, filter (a dict of metadata values or a callable taking a Document) and, for MMR, fetch_k and lambda_mult"


def _no_other(kwargs: dict[str, Any], method: str, takes: str = _SEARCH) -> None:
    """TypeError for keywords ``method`` does not take (a misspelt one was ignored, silently)."""
    if kwargs:
        raise TypeError(f"MemLongVectorStore.{method} got unknown keyword(s) {sorted(kwargs)}; it takes {takes}.")


def _as_stored(value: Any) -> Any:
    """``value`` as metadata reads back once stored (JSON): tuples become lists, also inside lists and dicts."""
    if isinstance(value, (list, tuple)):
        return [_as_stored(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _as_stored(v) for k, v in value.items()}
    return value


def _query_text(query: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("The query is empty: give the store some text to search for.")
    return query

class MemLongVectorStore(VectorStore):
    """LangChain ``VectorStore`` over one namespace of a MemLong memory bank; entries are stored as chunk K-V.

    Setup:
        ``ml = MemLong.from_pretrained("default", top_k=4)``

    Instantiate:
        .. code-block:: python

            store = MemLongVectorStore(memlong=ml, namespace="docs")

    ``chunk_context``: ``"chunk"`` (default) computes each chunk's K-V from the chunk alone, as pasting it into
    a prompt would; ``"document"`` inside its document's sliding window (see ``MemLong.ingest(context=)``).

    Add and search:
        .. code-block:: python

            store.add_documents(docs, ids=[...])            # K-V computed by the model
            store.similarity_search_with_score("query", k=4)
            retriever = store.as_retriever(search_kwargs={"k": 4})
            chat.invoke(question, memlong_chunk_ids=store.chunk_ids(retriever.invoke(question)))
    """

    def __init__(self, memlong: MemLong, *, namespace: str = "default", progress: bool = False,
                 chunk_context: Literal["chunk", "document"] = "chunk") -> None:
        if not isinstance(memlong, MemLong):
            raise TypeError(f"memlong must be a memlong.MemLong, got {type(memlong).__name__}.")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}.")
        if chunk_context not in ("chunk", "document"):
            raise ValueError(f"chunk_context must be 'chunk' or 'document', got {chunk_context!r}.")
        self.memlong = memlong
        self.namespace = namespace
        self.progress = progress
        self.chunk_context = chunk_context

    @property
    def bank(self):
        return self.memlong.bank

    @property
    def embeddings(self) -> Embeddings | None:
        return None  # the bank embeds with its own embedder

    # ------------------------------------------------------------------ entries
    def _entries(self, ids: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Entry id -> its chunk ids in document order: of every entry, or of those of ``ids`` that are stored
        (found without a scan of the namespace)."""
        return self.bank.doc_chunk_ids(self.namespace, doc_ids=None if ids is None else list(ids))

    def _document(self, entry_id: str, chunk_ids: list[str]) -> Document:
        """The entry's Document: its text is kept once, on its first chunk (joined chunk texts if evicted)."""
        chunks = [self.bank.get(cid, namespace=self.namespace) for cid in chunk_ids[:1]]
        text = chunks[0].metadata.get(TEXT_KEY) if chunks else None
        if text is None:
            text = "".join(self.bank.get(cid, namespace=self.namespace).text for cid in chunk_ids)
        metadata = {k: v for k, v in chunks[0].metadata.items() if not k.startswith(RESERVED_PREFIXES)}
        return Document(page_content=text, metadata=metadata, id=entry_id)

    def chunk_ids(self, documents: Sequence[Document]) -> list[str]:
        """Chunk ids to give :class:`ChatMemLong` for ``documents`` (this store's entries, or chunk Documents
        from :class:`MemLongRetriever`); in document order, without duplicates.

        Raises:
            memlong.UnknownChunkError: a document that is not (or no longer) in this store's namespace.
        """
        return memlong_chunk_ids_from_documents(documents, bank=self.bank, namespace=self.namespace)

    # ------------------------------------------------------------------ writing
    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                  ids: Sequence[str | None] | None = None, batch_size: int | None = None, **kwargs: Any) -> list[str]:
        """Ingest ``texts`` (K-V computed by the model); returns their ids. Existing ids are replaced. The add is
        atomic: all entries (and the removal of the versions they replace) or, on any error, nothing.
        ``batch_size`` (passed by LangChain's indexing API, ``langchain_core.indexing.index``) is taken and
        not used: the texts are streamed through the model one after the other, in one atomic add.

        Raises:
            ValueError: an empty text, ``metadatas`` / ``ids`` of another length than ``texts``, a metadata key
                reserved for memlong (``memlong_*``, ``_memlong*``), or entries larger than the capacity.
            memlong.MemoryFullError: the entries do not fit the bank's ``max_bytes``.
        """
        _no_other(kwargs, "add_texts", "texts, metadatas, ids and batch_size (the namespace is the store's)")
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"Got {len(texts)} texts but {len(metadatas)} metadatas.")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"Got {len(texts)} texts but {len(ids)} ids.")
        if not texts:
            return []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"Text {i} is empty: a vector store entry needs text to embed. Nothing was added.")
        ids = [str(i) if i is not None else str(uuid.uuid4()) for i in (ids or [None] * len(texts))]
        if "" in ids:
            raise ValueError(f"ids[{ids.index('')}] is the empty string; an entry id must be a non-empty string (or "
                             "None for a new random id). Nothing was added.")
        if len(set(ids)) != len(ids):
            raise ValueError("The same id appears twice in one add; ids must be unique.")
        metas = [check_user_metadata(m, f"metadatas[{i}]") for i, m in enumerate(metadatas or [{}] * len(texts))]

        def replaced() -> list[str]:  # read under entry_lock right before the add: concurrent upserts of an id
            old = self._entries(ids)   # replace each other (the last wins) instead of both keeping theirs
            return [cid for i in ids for cid in old.get(i, [])]

        ingest_entries(self.memlong, texts, namespace=self.namespace, doc_ids=ids, metadatas=metas,
                       entry_metadata=[{TEXT_KEY: t} for t in texts],  # the entry's text once, not per chunk
                       replace=replaced, progress=self.progress, context=self.chunk_context)
        return ids

    async def aadd_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                         ids: Sequence[str | None] | None = None, **kwargs: Any) -> list[str]:
        """:meth:`add_texts` in a worker thread; cancelling the await stops the ingest and adds nothing."""
        return await in_thread(self.add_texts, texts, metadatas, ids=ids, **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete entries by id (all entries when ``ids`` is None); returns True: none of ``ids`` is stored any
        more. Missing ids (deleted before, evicted, never added) are ignored, as LangChain's stores do; a False
        made LangChain's indexing API fail every later cleanup that named an evicted entry."""
        _no_other(kwargs, "delete", "ids (None: every entry)")  # delete(id=[...]) deleted every entry
        if ids is None:
            with entry_lock(self.bank, self.namespace):
                self.bank.reset(self.namespace)
            return True
        with entry_lock(self.bank, self.namespace):
            entries = self._entries(ids)
            drop = [cid for i in ids for cid in entries.get(i, [])]
            if drop:
                self.bank.delete(drop, namespace=self.namespace)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored entries among ``ids`` (missing ids are skipped)."""
        with self.bank.reading():  # one state: an entry replaced meanwhile is read whole, old or new
            entries = self._entries(ids)
            return [self._document(i, entries[i]) for i in dict.fromkeys(ids) if i in entries]

    # ------------------------------------------------------------------ search
    def similarity_search_with_score(self, query: str, k: int = 4, filter: MetadataFilter | None = None,  # noqa: A002
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """The ``k`` best entries with their cosine similarity (best chunk), best first. (Always dense: for
        lexical or hybrid ranking use :class:`MemLongRetriever` with ``search_mode``.)

        ``filter``: keep only entries whose ``metadata`` has every key of a dict with an equal value, or for
        which a callable taking the ``Document`` returns true (as LangChain's ``InMemoryVectorStore``; it runs inside
        ``bank.reading()`` and must not change the bank). Other keywords are refused (a misspelt ``filters=``
        was ignored, silently)."""
        _no_other(kwargs, "similarity_search")
        return [(doc, score) for doc, score, _ in self._search(_query_text(query), k, filter)]

    def similarity_search(self, query: str, k: int = 4, filter: MetadataFilter | None = None,  # noqa: A002
                          **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4,
                                    filter: MetadataFilter | None = None, **kwargs: Any) -> list[Document]:  # noqa: A002
        _no_other(kwargs, "similarity_search_by_vector")
        return [doc for doc, _, _ in self._search(embedding, k, filter)]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      filter: MetadataFilter | None = None, **kwargs: Any) -> list[Document]:  # noqa: A002
        """``k`` entries chosen by maximal marginal relevance among the ``fetch_k`` most similar (``lambda_mult``:
        1 = relevance only, 0 = diversity only), as LangChain's ``InMemoryVectorStore`` chooses them. ``filter``
        as in :meth:`similarity_search_with_score`. Also through ``as_retriever(search_type="mmr")``."""
        return self.max_marginal_relevance_search_by_vector(self._embed(_query_text(query)), k, fetch_k,
                                                            lambda_mult, filter=filter, **kwargs)

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, filter: MetadataFilter | None = None,  # noqa: A002
                                                **kwargs: Any) -> list[Document]:
        """:meth:`max_marginal_relevance_search` for a query vector (of the bank's embedder)."""
        _no_other(kwargs, "max_marginal_relevance_search")
        hits = self._search(embedding, max(fetch_k, k), filter, count=False)
        if not hits or k <= 0:
            return []
        vectors = self._embed([doc.page_content for doc, _, _ in hits])
        chosen = maximal_marginal_relevance(np.asarray(embedding, dtype=np.float32), list(vectors), k=k,
                                            lambda_mult=lambda_mult)
        self.bank.mark_retrieved([hits[i][2] for i in chosen], namespace=self.namespace)  # each one's best chunk
        return [hits[i][0] for i in chosen]

    def _embed(self, texts: str | list[str]) -> Any:
        """The bank embedder's vectors (one for a string, a matrix for a list)."""
        vectors = np.asarray(self.bank.embedder.encode([texts] if isinstance(texts, str) else texts), np.float32)
        return vectors[0] if isinstance(texts, str) else vectors

    def _search(self, query: Any, k: int, filter: MetadataFilter | None = None,  # noqa: A002
                *, count: bool = True) -> list[tuple[Document, float, str]]:
        """``(entry, score, best chunk id)`` of the ``k`` best entries, best first (:meth:`_search_held`)."""
        query = query_vector(self.bank.embedder, query)  # once, before the bank is held (not on each widening pass)
        with self.bank.reading():  # the entries, the hits and their documents of one state (writers wait)
            return self._search_held(query, k, filter, count)

    def _search_held(self, query: Any, k: int, filter: MetadataFilter | None,  # noqa: A002
                     count: bool) -> list[tuple[Document, float, str]]:
        k = check_count(k, "k")
        keep = _filter_fn(filter)
        total = self.bank.num_chunks(self.namespace)
        if k <= 0 or total == 0:
            return []
        entries: dict[str, list[str]] = {}  # of the entries hit so far (no read of every entry per search)
        want = min(total, 4 * k)
        while True:  # widen until k distinct entries that pass the filter (an entry may own several chunks)
            best: dict[str, tuple[str, float]] = {}
            rejected: set[str] = set()
            hits = self.bank.search(query, namespace=self.namespace, k=want, count=False, mode="dense")
            of = {h.chunk_id: self.bank.get(h.chunk_id, namespace=self.namespace).doc_id for h in hits}
            entries.update(self._entries([e for e in dict.fromkeys(of.values()) if e not in entries]))
            for hit in hits:
                entry = of[hit.chunk_id]
                if entry in best or entry in rejected:
                    continue
                if keep is None or keep(self._document(entry, entries[entry])):
                    best[entry] = (hit.chunk_id, hit.score)
                else:
                    rejected.add(entry)
            if len(best) >= k or want >= total:
                break
            want = min(total, want * 4)
        chosen = list(best.items())[:k]
        if count:
            self.bank.mark_retrieved([cid for _, (cid, _) in chosen], namespace=self.namespace)
        return [(self._document(entry, entries[entry]), score, cid) for entry, (cid, score) in chosen]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda similarity: (1.0 + similarity) / 2.0  # cosine in [-1, 1] -> relevance in [0, 1]

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings | None = None, metadatas: list[dict] | None = None, *,
                   ids: list[str] | None = None, memlong: MemLong | None = None, namespace: str = "default",
                   **kwargs: Any) -> MemLongVectorStore:
        """Build a store over ``memlong.bank`` and add ``texts``. ``embedding`` must be None: the bank embeds
        with its own embedder (pass another one to ``MemLong(..., embedder=...)``)."""
        if embedding is not None:
            raise ValueError("MemLongVectorStore embeds with its MemoryBank's embedder; pass embedding=None "
                             "(choose the embedder when building the MemLong model).")
        if memlong is None:
            raise ValueError("MemLongVectorStore.from_texts needs memlong=<a MemLong model>.")
        store = cls(memlong, namespace=namespace, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    def from_documents(cls, documents: list[Document], embedding: Embeddings | None = None,
                       **kwargs: Any) -> MemLongVectorStore:
        """Build a store over ``memlong.bank`` (keyword ``memlong=``) and add ``documents`` (their ids kept, as
        :meth:`add_documents` does); ``embedding`` must be None, as in :meth:`from_texts`."""
        if "ids" not in kwargs and any(doc.id for doc in documents):
            kwargs["ids"] = [doc.id for doc in documents]
        return cls.from_texts([d.page_content for d in documents], embedding, [d.metadata for d in documents],
                              **kwargs)

    @classmethod
    async def afrom_texts(cls, texts: list[str], embedding: Embeddings | None = None,
                          metadatas: list[dict] | None = None, *, ids: list[str] | None = None,
                          **kwargs: Any) -> MemLongVectorStore:
        """:meth:`from_texts` in a worker thread (cancellable, as :meth:`aadd_texts` is)."""
        return await in_thread(cls.from_texts, texts, embedding, metadatas, ids=ids, **kwargs)

    @classmethod
    async def afrom_documents(cls, documents: list[Document], embedding: Embeddings | None = None,
                              **kwargs: Any) -> MemLongVectorStore:
        """:meth:`from_documents` in a worker thread."""
        return await in_thread(cls.from_documents, documents, embedding, **kwargs)

