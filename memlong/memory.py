"""`MemoryBank` (Ret-Mem): chunk texts, retriever embeddings and the chunks' stored K-V.

Contract:
    * A chunk is ``chunk_size`` (or fewer) consecutive tokens of one document. For every chunk the
      bank keeps: an unguessable id, its namespace, document id, text, token span, a unit-norm
      retriever embedding, a retrieval counter, and the keys (before RoPE) and values of each
      *source layer*: ``keys``/``values`` of shape ``(n_source_layers, n_kv_heads, tokens, head_dim)``.
    * What may enter: the rules of :mod:`memlong.records`, the same ones the loader applies, so whatever a
      bank holds can always be saved and loaded again. :meth:`MemoryBank.get` returns copies.
    * Search (``search_mode``, :mod:`memlong.search`): ``"dense"`` (faiss inner product of embeddings, the
      paper's retriever), ``"lexical"`` (BM25 over chunk words) or ``"hybrid"`` (both rankings fused by
      reciprocal rank). Lexical matching finds names, numbers and rare words that a small embedder blurs.
    * Namespaces are hard boundaries: each has its own faiss inner-product index, its own capacity
      and its own eviction; every call that takes chunk ids also takes the caller's namespace and
      refuses ids that live elsewhere (with the same message as for ids that never existed). Errors name
      only the caller's namespace; a namespace that does not exist behaves as an empty one, and one emptied is gone.
    * Row ``i`` (slot) of a namespace's faiss index is always chunk ``ids[i]`` (:class:`memlong.search.NamespaceIndex`).
    * Eviction (:mod:`memlong.eviction`, when a namespace exceeds ``capacity`` tokens): drop the oldest ``evict_oldest``
      share, keep the newest ``keep_newest`` share, and between them evict the least-retrieved chunks (oldest first
      on ties) until at most half the capacity is used; a namespace never stays above ``capacity``.
    * Bytes (``max_bytes``, optional): K-V, embeddings, texts and metadata of the whole bank. An add that
      overflows it evicts in the namespace being written (same order as above) until the bank fits; an add
      that cannot fit even then (other namespaces hold the bytes, or the add alone is larger than ``max_bytes``)
      raises :class:`MemoryFullError`, writing nothing.
    * Atomic writes: an add either happens whole (with its evictions) or raises and changes nothing;
      ``add_chunks(..., replace=ids)`` swaps chunks in one step (an upsert) and never evicts what it writes.
    * Threads: any number of threads may search, fetch and read while others add, delete or evict. A
      reader-writer lock (:mod:`memlong.rwlock`) lets readers run side by side; a writer holds it exclusively
      only to publish (embedding and K-V conversion happen before), and a waiting writer holds back readers.
    * Persistence: :meth:`MemoryBank.save` / :meth:`MemoryBank.load` (format in :mod:`memlong.storage`).
    * K-V payloads (:mod:`memlong.kv_store`): in memory, or with ``path=`` on disk in append-only segment files,
      memory-mapped on read (a bank larger than RAM; :meth:`commit` makes it durable, :meth:`load` reopens it
      in place). ``quantization="int8"`` stores K-V in the KIVI layout (:mod:`memlong.kv_payload`).

Example:
    >>> bank = MemoryBank(embedder=Embedder(), capacity=32768)
    >>> ids = bank.add_chunks(["To be, or not to be"], keys=[k], values=[v], namespace="hamlet")
    >>> hits = bank.search("famous question", namespace="hamlet", k=1)
    >>> keys, values = bank.fetch([h.chunk_id for h in hits], namespace="hamlet")
    >>> bank.save("hamlet.bank")
    >>> bank = MemoryBank.load("hamlet.bank", embedder=Embedder())
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from memlong.bank_files import DTYPE_NAMES, BankFiles
from memlong.bank_views import BankViews
from memlong.bank_writes import BankWrites, check_doc_id, is_staging
from memlong.dtypes import to_dtype
from memlong.embedder import TextEmbedder, check_embedder
from memlong.eviction import MemoryEvictionWarning, MemoryFullError, warn_evicted
from memlong.kv_payload import Quantization, check_quantization
from memlong.kv_store import new_store
from memlong.records import (
    Chunk,
    MemoryMismatchError,
    as_list,
    check_bank_config,
    check_count,
    check_namespace,
    check_text,
    metadata_nbytes,
)
from memlong.rwlock import RWLock as _RWLock
from memlong.search import NamespaceIndex, SearchMode, check_ann_min, check_mode, depth, fuse
from memlong.storage import MemoryFileError

if TYPE_CHECKING:
    from memlong.kv_cache import DeviceCache

__all__ = ["Chunk", "MemoryBank", "MemoryEvictionWarning", "MemoryFileError", "MemoryFullError", "MemoryMismatchError",
           "SearchHit", "UnknownChunkError", "query_vector"]

class UnknownChunkError(KeyError):
    """A chunk id that does not exist in the caller's namespace (never created, deleted, evicted, or another's)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass(frozen=True)
class SearchHit:
    """One search result: a chunk id and its score (higher is better), comparable only within one search mode:
    ``"dense"`` the inner product of unit embeddings (cosine, -1..1), ``"lexical"`` BM25 (>= 0), ``"hybrid"``
    the reciprocal-rank fusion of both (sum of ``1 / (60 + rank)``, ranks from 1)."""

    chunk_id: str
    score: float


class MemoryBank(BankWrites, BankViews, BankFiles):
    """Chunk-level K-V memory with a faiss retriever, namespaces and the paper's eviction rule.

    Args:
        embedder: turns chunk texts and queries into unit vectors (see :mod:`memlong.embedder`).
        capacity: tokens per namespace before eviction runs (a positive integer).
        evict_oldest: share (``[0, 1)``) of the oldest chunks dropped on eviction.
        keep_newest: share (``[0, 1)``) of the newest chunks kept on eviction while the namespace fits
            ``capacity`` (``evict_oldest + keep_newest <= 1``).
        dtype: dtype of stored K-V.
        device: device of stored K-V (``"cpu"`` keeps GPU memory for the model).
        pin_memory: keep CPU-stored K-V in page-locked memory, so that retrieved chunks copy to a GPU at
            full PCIe speed (needs CUDA and ``device="cpu"``).
        use_gpu_index: faiss GPU index; ``None``: when ``faiss.get_num_gpus() > 0``.
        max_bytes: bytes (K-V + embeddings + texts + metadata) the whole bank may hold; ``None``: bounded by
            ``capacity`` per namespace only. See :class:`MemoryFullError`.
        search_mode: how :meth:`search` ranks chunks when not told otherwise: ``"dense"`` (embeddings),
            ``"lexical"`` (BM25 over words) or ``"hybrid"`` (both, fused by reciprocal rank).
        quantization: ``"none"`` (K-V in ``dtype``, exact) or ``"int8"`` (KIVI layout, dequantized to ``dtype``
            on fetch; about half the bytes of float16).
        path: a directory for a disk bank: K-V go to segment files there and only retrieved chunks are read
            back; :meth:`commit` makes the bank durable there (``None``: K-V in memory). A directory already
            holding a bank is refused (reopen it with :meth:`load`).
        segment_bytes: a disk bank's K-V buffered in RAM before they are written as one segment file.
        ann_min_chunks: namespaces with at least this many chunks search an approximate IVF index (trained on
            their embeddings, retrained as they double; deletes stay exact; :class:`memlong.search.NamespaceIndex`);
            ``None``: exact search at any size.

    Raises:
        ValueError: a setting outside the ranges above, named with the value given.
    """

    def __init__(self, *, embedder: TextEmbedder, capacity: int = 32_768, evict_oldest: float = 0.10,
                 keep_newest: float = 0.10, dtype: torch.dtype | str = torch.float16,
                 device: str | torch.device = "cpu", use_gpu_index: bool | None = None,
                 max_bytes: int | None = None, pin_memory: bool = False, search_mode: SearchMode = "dense",
                 quantization: Quantization = "none", path: str | os.PathLike | None = None,
                 segment_bytes: int = 64 << 20, ann_min_chunks: int | None = None) -> None:
        check_bank_config(capacity, evict_oldest, keep_newest, max_bytes)
        self.quantization = check_quantization(quantization)
        self.ann_min_chunks = check_ann_min(ann_min_chunks)
        self.embedder, dtype = check_embedder(embedder), to_dtype(dtype)  # a dtype's name too
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES.values())}, got {dtype!r}.")
        self.capacity = int(capacity)
        self.evict_oldest = float(evict_oldest)
        self.keep_newest = float(keep_newest)
        self.dtype = dtype
        self.device = torch.device(device)
        if pin_memory and (self.device.type != "cpu" or not torch.cuda.is_available()):
            raise ValueError("pin_memory=True pins CPU memory for copies to a GPU: it needs device='cpu' and CUDA "
                             f"(device={str(self.device)!r}, CUDA available: {torch.cuda.is_available()}). "
                             "Drop pin_memory, or use memory_device='cpu'.")
        self.pin_memory = pin_memory
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.search_mode = check_mode(search_mode)
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.use_gpu_index = gpus > 0 if use_gpu_index is None else (use_gpu_index and gpus > 0)
        self._chunks: dict[str, Chunk] = {}
        self._sizes: dict[str, int] = {}  # chunk id -> bytes it counts towards max_bytes
        self._spaces: dict[str, NamespaceIndex] = {}
        self._order = itertools.count()
        self._lock = _RWLock()
        self._count_lock = threading.Lock()  # retrieval counters, bumped by concurrent readers
        self._gpu_lock = threading.Lock()  # faiss GPU indexes are not safe for concurrent searches
        self.path = None if path is None else Path(path)
        self._store = new_store(self.path, quantization, dtype, self.device, segment_bytes)

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the bank stores K-V: its device and dtype, contiguous, pinned if asked."""
        t = t.to(self.device, self.dtype).contiguous()
        return t.pin_memory() if self.pin_memory else t

    # ------------------------------------------------------------------ writing
    def add_chunks(self, texts: Sequence[str], *, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                   namespace: str = "default", doc_id: str | None = None,
                   spans: Sequence[tuple[int, int]] | None = None, embeddings: np.ndarray | None = None,
                   metadata: Sequence[dict[str, Any]] | None = None,
                   tokens: Sequence[Sequence[int]] | None = None, replace: Iterable[str] = (),
                   doc_ids: Sequence[str] | None = None, atomic: bool = False) -> list[str]:
        """Store chunks (in document order) and return their new ids, one per text; evicts if the namespace overflows.

        ``keys[i]``/``values[i]``: ``(n_source_layers, n_kv_heads, tokens_i, head_dim)``, keys before RoPE.
        ``tokens[i]`` (optional): the ``tokens_i`` token ids the K-V were computed from (``MemLong`` records
        them; ``kv_refresh`` re-encodes some of them at generation). ``doc_ids`` (instead of ``doc_id``): one
        document id per chunk, to write several documents in one atomic add. ``replace``: ids of ``namespace``
        removed in the same step (an upsert). With ``replace`` or ``atomic=True`` the new chunks are never evicted
        by this add: if they cannot all fit the limits, nothing changes and the error says so. Every field is
        checked by the rules the loader applies (:mod:`memlong.records`); an add that raises changes nothing. An add
        larger than the namespace's room evicts its own oldest new chunks too (after a ``MemoryEvictionWarning``):
        their ids are returned in place but not stored; :meth:`stored` filters them out.

        Raises:
            ValueError: a field that breaks the rules (named), a chunk larger than ``capacity``, a bad namespace.
            UnknownChunkError: a ``replace`` id that is not in ``namespace``.
            MemoryFullError: the chunks do not fit ``max_bytes`` beside the other namespaces.
        """
        replace, texts = as_list(replace, "replace"), as_list(texts, "texts")
        n = len(texts)
        check_namespace(namespace)
        if n == 0 and not replace:
            return []
        if doc_ids is not None and doc_id is not None:
            raise ValueError("add_chunks takes doc_id (one for all chunks) or doc_ids (one per chunk), not both.")
        check_doc_id(doc_id)
        if doc_ids is not None and (isinstance(doc_ids, str) or not isinstance(doc_ids, Sequence)):
            raise ValueError("doc_ids must be a list with one string per chunk.")
        new, vectors = self._prepare(texts, keys, values, doc_ids if doc_ids is not None else doc_id, spans,
                                     embeddings, metadata, tokens)
        sizes = {c.id: self._size_of(c) for c in new}
        with self._lock.write():
            self._store.flush()  # a disk bank writes a full buffer first: if the disk refuses, nothing changed
            space = self._spaces.get(namespace)
            drop = {self._get(cid, namespace).id for cid in replace}
            self._check_shapes(namespace, new, drop)
            for c in new:
                c.namespace, c.order = namespace, next(self._order)
            evict_cap, evict_bytes = self._plan(namespace, space, drop, new, sizes, protect=atomic or bool(replace))
            # warned before anything changes: a warning made an error (warnings.simplefilter) leaves the bank as it was
            if not is_staging(namespace):  # an upsert's staging: it raises its own clear error
                warn_evicted(namespace, len(evict_cap), f"memory_capacity={self.capacity} tokens",
                             "raise memory_capacity (MemLongConfig / MemoryBank(capacity=...))")
                warn_evicted(namespace, len(evict_bytes), f"max_bytes={self.max_bytes}",
                             "raise max_bytes or reset other namespaces")
            space = self._space(namespace, create=True)
            # an unprotected write may evict some of its own (older) new chunks: those are never stored
            victims = drop | evict_cap | evict_bytes
            stored = [i for i, c in enumerate(new) if c.id not in victims]
            self._remove(namespace, victims - {c.id for c in new})
            kept = [new[i] for i in stored]
            for c in kept:
                self._chunks[c.id] = c
                self._sizes[c.id] = sizes[c.id]
                space.tokens += c.n_tokens
                space.nbytes += sizes[c.id]
            space.add([c.id for c in kept], vectors[stored], [c.text for c in kept], [c.doc_id for c in kept])
            self._store.put(kept)
            if not space.ids:  # emptied by its replace (or an add of nothing): gone, as after delete
                del self._spaces[namespace]
            return [c.id for c in new]

    def delete(self, chunk_ids: Iterable[str] = (), *, namespace: str = "default", doc_id: str | None = None) -> int:
        """Delete chunks by id and/or all chunks of ``doc_id``; returns how many. A namespace left empty is gone.

        Raises:
            UnknownChunkError: an id not in ``namespace`` (nothing is deleted).
        """
        chunk_ids = as_list(chunk_ids, "chunk_ids")
        check_namespace(namespace)
        check_doc_id(doc_id)
        with self._lock.write():
            drop = {self._get(cid, namespace).id for cid in chunk_ids}
            space = self._spaces.get(namespace)
            if doc_id is not None and space is not None:
                drop |= space.docs.get(doc_id, set())  # (the namespace's document index: no scan)
            self._remove(namespace, drop)
            if drop and not space.ids:  # emptied: gone as after reset (it stayed, per session)
                del self._spaces[namespace]
            return len(drop)

    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace, or everything when ``namespace`` is None."""
        with self._lock.write():
            names = list(self._visible()) if namespace is None else [check_namespace(namespace)]  # one name, not a list
            for name in names:
                space = self._spaces.pop(name, None)
                if space is not None:
                    self._store.drop(self._chunks[cid] for cid in space.ids)
                    for cid in space.ids:
                        del self._chunks[cid]
                        del self._sizes[cid]

    # ------------------------------------------------------------------ reading
    def search(self, query: str | np.ndarray | torch.Tensor | Sequence[float], *, namespace: str = "default", k: int = 8,
               exclude: Iterable[str] = (), count: bool = True, mode: SearchMode | None = None) -> list[SearchHit]:
        """Top-``k`` chunks of ``namespace`` for the query (text, or a vector for dense search).

        ``exclude``: ids to skip (e.g. chunks still inside the local window). ``count``: bump the
        retrieval counters that eviction uses. ``mode``: ``"dense"`` (score: inner product), ``"lexical"``
        (score: BM25; only chunks sharing a word with the query), ``"hybrid"`` (score: reciprocal rank fusion
        of both rankings); default: the bank's ``search_mode``.

        Example:
            >>> bank.search("Who keeps the iron key?", namespace="docs", k=4, mode="hybrid")
        """
        mode, k = check_mode(self.search_mode if mode is None else mode), check_count(k, "k")
        check_namespace(namespace)  # None or "" found nothing, silently (an answer without memory)
        if k == 0:
            return []
        if mode != "dense" and not isinstance(query, str):
            raise ValueError(f"search mode {mode!r} matches words, so it needs the query text, not a vector; pass "
                             "the text or use mode='dense'.")
        vector = None if mode == "lexical" else query_vector(self.embedder, query)
        skip = set(as_list(exclude, "exclude"))
        with self._lock.read():
            space = self._spaces.get(namespace)
            if space is None or not space.ids:
                return []
            ranked: list[list[tuple[str, float]]] = []
            if vector is not None:
                want = min(len(space.ids), depth(mode, k) + len(skip))
                with self._gpu_lock if self.use_gpu_index else contextlib.nullcontext():
                    ranked.append([(cid, sc) for cid, sc in space.dense(vector, want) if cid not in skip])
            if mode != "dense":
                lexical = space.lexical.top(query, depth(mode, k), skip)
                ranked.append(sorted(lexical, key=lambda item: (-item[1], self._chunks[item[0]].order)))
            pairs = fuse(ranked, lambda cid: self._chunks[cid].order) if mode == "hybrid" else ranked[0]
            hits = [SearchHit(cid, score) for cid, score in pairs[:k]]
            if count:
                self._bump(namespace, [hit.chunk_id for hit in hits])
            return hits

    def mark_retrieved(self, chunk_ids: Iterable[str], *, namespace: str = "default") -> None:
        """Bump the retrieval counters (which eviction reads) of ``chunk_ids`` as a counted search would.

        For callers that search with ``count=False`` and then keep only some hits (e.g. one chunk per stored
        entry). Ids no longer in ``namespace`` (deleted or evicted meanwhile) are skipped.
        """
        chunk_ids = as_list(chunk_ids, "chunk_ids")  # one string is one id, not its characters
        with self._lock.read():
            self._bump(check_namespace(namespace), chunk_ids)

    def _bump(self, namespace: str, chunk_ids: Iterable[str]) -> None:
        with self._count_lock:  # readers hold the read lock only: counters need their own
            for cid in chunk_ids:
                chunk = self._chunks.get(cid) if isinstance(cid, str) else None
                if chunk is not None and chunk.namespace == namespace:
                    chunk.retrievals += 1

    def fetch(self, chunk_ids: Sequence[str], *, namespace: str = "default", device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, cache: DeviceCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K-V of ``chunk_ids`` concatenated in document order: ``(n_source_layers, n_kv_heads, tokens, head_dim)``.
        With a ``cache`` (:class:`memlong.kv_cache.DeviceCache`) on its device, chunks it holds are not copied again."""
        check_namespace(namespace), _check_dtype(dtype)  # (namespace None said "not in namespace None")
        with self._lock.read():
            chunks = sorted((self._get(cid, namespace) for cid in dict.fromkeys(as_list(chunk_ids, "chunk_ids"))),
                            key=lambda c: c.order)
        if not chunks:
            raise ValueError("fetch needs at least one chunk id.")
        # Stored tensors are never written in place: concatenated outside the lock. Each chunk moves to the target
        # device first and is concatenated there (one copy, not a CPU concatenation and a second copy). non_blocking
        # only towards a GPU, where the concatenation is ordered after the copies on the same stream.
        device = cache.device if cache is not None else torch.device(device) if device is not None else self.device
        nb = device.type == "cuda"

        def copy(c: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self._store.read(c)  # a disk bank: MemoryFileError for corrupted (non-finite) pages
            return keys.to(device, non_blocking=nb), values.to(device, non_blocking=nb)

        parts = cache.read(namespace, chunks, dtype, copy) if cache is not None else [copy(c) for c in chunks]
        keys, values = (_joined([part[i] for part in parts], dtype) for i in (0, 1))
        self._store.release(chunks)  # a disk bank: the copied pages leave resident memory
        return keys, values

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self._visible().values())

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("max_bytes", self.max_bytes), ("quantization", self.quantization),
                                                    ("path", self.path and str(self.path))) if v not in (None, "none"))
        return f"MemoryBank(chunks={len(self)}, tokens={self.num_tokens()}, capacity={self.capacity}{extra})"

    # ---------------------------------------------------------------- internals
    def _space(self, namespace: str, create: bool = False) -> NamespaceIndex:
        check_namespace(namespace)
        space = self._spaces.get(namespace)
        if space is None:
            if not create:
                raise KeyError(f"Namespace {namespace!r} does not exist: nothing was ever stored in it, or it "
                               "was reset.")
            space = self._spaces[namespace] = NamespaceIndex(self.embedder.dim, self.use_gpu_index, self.ann_min_chunks)
        return space

    def _get(self, chunk_id: str, namespace: str) -> Chunk:
        chunk = self._chunks.get(chunk_id) if isinstance(chunk_id, str) else None
        if chunk is None or chunk.namespace != namespace:
            # Same message whether it never existed or lives elsewhere: namespaces leak nothing.
            raise UnknownChunkError(
                f"Chunk id {str(chunk_id)[:100]!r} is not in namespace {namespace!r}: it was never stored there, or "
                "it was deleted or evicted. Use ids returned by search()/ingest() for the same namespace.")
        return chunk

    def _size_of(self, chunk: Chunk) -> int:
        """Bytes ``chunk`` counts towards ``max_bytes``: K-V, embedding, text, doc id and metadata."""
        return (chunk.kv.nbytes + 4 * self.embedder.dim + len(chunk.text.encode("utf-8"))
                + len(chunk.doc_id.encode("utf-8")) + metadata_nbytes(chunk.metadata))

    def _total_bytes(self) -> int:
        return sum(s.nbytes for s in self._visible().values())

    def _remove(self, namespace: str, drop: set[str]) -> None:
        if not drop:
            return
        space = self._spaces[namespace]
        self._store.drop(self._chunks[cid] for cid in drop)
        for cid in drop:
            chunk = self._chunks.pop(cid)
            space.tokens -= chunk.n_tokens
            space.nbytes -= self._sizes.pop(cid)
        space.remove(drop)


def query_vector(embedder: TextEmbedder, query: Any) -> np.ndarray:
    """The unit ``(1, dim)`` float32 vector of a search query (its text embedded, or a vector); TypeError /
    ValueError naming what is wrong with the query. ``MemoryBank.search`` takes either; callers that search one query
    several times embed it once with this."""
    if isinstance(query, str):  # (not blank: "" returned hits, while every adapter refused it)
        vector = embedder.encode([check_text(query, "search query")])
    else:
        try:
            if query is None or isinstance(query, (bytes, bytearray, numbers.Number)):
                raise TypeError
            vector = np.asarray(query, np.float32)
        except (TypeError, ValueError):
            raise TypeError(f"query must be text or a vector of dimension {embedder.dim}, got {type(query).__name__} "
                            f"{str(query)[:50]!r}.") from None
    if vector.size != embedder.dim or (vector.ndim == 2 and vector.shape[0] != 1) or vector.ndim > 2:
        raise ValueError(f"query must be one vector of dimension {embedder.dim} (the bank's embedder), got an array of "
                         f"shape {vector.shape}; search one query at a time.")
    vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
    if not np.isfinite(vector).all() or not (isinstance(query, str) or vector.any()):  # NaN found nothing, silently
        raise ValueError("query vector must be finite and not all zeros (it has no direction to search); check the "
                         "embedding that produced it.")
    wide = vector.astype(np.float64)
    faiss.normalize_L2(vector)
    if not 0.99 < float(vector[0] @ vector[0]) < 1.01:  # its float32 sum of squares overflowed or underflowed
        vector = (wide / np.linalg.norm(wide)).astype(np.float32)
    return vector


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch dtype (K-V are floats; an integer dtype would "
                         f"truncate them), got {dtype!r}.")


def _joined(parts: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """``parts`` concatenated along the token dimension into a new tensor of ``dtype`` (None: theirs), converted
    while copied: one pass, not a concatenation and a conversion."""
    first = parts[0]
    out = first.new_empty((*first.shape[:2], sum(p.shape[2] for p in parts), first.shape[3]), dtype=dtype or first.dtype)
    at = 0
    for part in parts:
        out[:, :, at:at + part.shape[2]] = part
        at += part.shape[2]
    return out
