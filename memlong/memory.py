"""`MemoryBank` (Ret-Mem): chunk texts, retriever embeddings and the chunks' stored K-V.

Contract:
    * A chunk is ``chunk_size`` (or fewer) consecutive tokens of one document. For every chunk the
      bank keeps: an unguessable id, its namespace, document id, text, token span, a unit-norm
      retriever embedding, a retrieval counter, and the keys (before RoPE) and values of each
      *source layer*: ``keys``/``values`` of shape ``(n_source_layers, n_kv_heads, tokens, head_dim)``.
    * Search (``search_mode``): ``"dense"`` (faiss inner product of embeddings, the paper's retriever),
      ``"lexical"`` (BM25 over chunk words) or ``"hybrid"`` (both rankings fused by reciprocal rank). Lexical
      matching finds names, numbers and rare words that a small embedder blurs (README, "RAG").
    * Namespaces are hard boundaries: each has its own faiss inner-product index, its own capacity
      and its own eviction; every call that takes chunk ids also takes the caller's namespace and
      refuses ids that live elsewhere (with the same message as for ids that never existed).
    * Row ``i`` of a namespace's faiss index is always chunk ``ids[i]``: every removal rebuilds the
      index from the kept embeddings, so K-V, texts and index cannot drift apart.
    * Eviction (when a namespace exceeds ``capacity`` tokens): drop the oldest ``evict_oldest`` share,
      keep the newest ``keep_newest`` share, and between them evict the least-retrieved chunks (oldest
      first on ties) until at most half the capacity is used.
    * Bytes (``max_bytes``, optional): K-V, embeddings and texts of the whole bank. An add that overflows
      it evicts in the namespace being written (same order as above) until the bank fits; an add that
      cannot fit even then (other namespaces hold the bytes) raises :class:`MemoryFullError`, writing nothing.
    * Threads: any number of threads may search, fetch and read while others add, delete or evict. A
      reader-writer lock lets readers run side by side; a writer holds it exclusively only to publish
      (embedding and K-V conversion happen before), and a waiting writer holds back new readers.
    * Persistence: :meth:`MemoryBank.save` / :meth:`MemoryBank.load` (format in :mod:`memlong.storage`).

Example:
    >>> bank = MemoryBank(embedder=Embedder(), capacity=32768)
    >>> ids = bank.add_chunks(["To be, or not to be"], keys=[k], values=[v], namespace="hamlet")
    >>> hits = bank.search("famous question", namespace="hamlet", k=1)
    >>> keys, values = bank.fetch([h.chunk_id for h in hits], namespace="hamlet")
    >>> bank.save("hamlet.bank")
    >>> bank = MemoryBank.load("hamlet.bank", embedder=Embedder())
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import re
import secrets
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

from memlong.embedder import TextEmbedder
from memlong.storage import MemoryFileError, read_bank, write_bank

__all__ = ["Chunk", "MemoryBank", "MemoryEvictionWarning", "MemoryFileError", "MemoryFullError", "MemoryMismatchError",
           "SearchHit", "UnknownChunkError"]

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
_CHUNK_ID = re.compile(r"^[0-9a-f]{24}$")
# Fingerprint keys recorded for information only: paths differ between machines holding the same model.
_INFO_KEYS = ("model",)


class UnknownChunkError(KeyError):
    """A chunk id that does not exist in the caller's namespace (never created, deleted, evicted, or another's)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class MemoryFullError(ValueError):
    """An add or load that would exceed the bank's ``max_bytes`` even after evicting in its own namespace."""


class MemoryEvictionWarning(UserWarning):
    """Chunks were evicted because a namespace outgrew ``capacity`` (or the bank ``max_bytes``): the ids
    that :meth:`MemoryBank.add_chunks` returned earlier may be gone. Raise the limit to keep everything."""


class MemoryMismatchError(MemoryFileError):
    """A saved bank made by a different model, config or embedder than the one loading it."""


@dataclass
class Chunk:
    """One stored chunk. ``keys``/``values``: ``(n_source_layers, n_kv_heads, tokens, head_dim)``."""

    id: str
    namespace: str
    doc_id: str
    text: str
    span: tuple[int, int]  # token offsets [start, end) in its document
    order: int  # insertion order in the bank: document order within a document
    keys: torch.Tensor
    values: torch.Tensor
    retrievals: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    tokens: tuple[int, ...] | None = None  # the token ids the K-V were computed from (None: not recorded)

    @property
    def n_tokens(self) -> int:
        return int(self.keys.shape[2])


@dataclass(frozen=True)
class SearchHit:
    chunk_id: str
    score: float


class _RWLock:
    """Many readers at once, or one writer. A waiting writer holds back new readers, so a stream of searches
    cannot starve an ingest. Not reentrant: each public method of the bank takes it once."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


SearchMode = Literal["dense", "lexical", "hybrid"]
_WORD = re.compile(r"\w+")
_RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (_RRF_K + rank), the usual constant


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _Lexical:
    """BM25 (k1=1.2, b=0.75) over one namespace's chunk texts: an inverted index, updated with the namespace.

    Every chunk gets a slot (insertion order; a removed chunk's slot stays empty). Postings are dicts for cheap
    updates and are turned into numpy arrays, cached per word until the word's postings change, so a query
    costs a few vector operations per query word (``benchmarks/cpu.py`` measures it)."""

    K1, B = 1.2, 0.75

    def __init__(self) -> None:
        self.postings: dict[str, dict[int, int]] = collections.defaultdict(dict)  # word -> {slot: count}
        self.slot_of: dict[str, int] = {}
        self.id_of: list[str | None] = []
        self.words_of: list[tuple[str, ...]] = []
        self.length_of: list[int] = []
        self.total = 0
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lengths: np.ndarray | None = None

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        for cid, text in zip(ids, texts):
            words = _words(text)
            slot = len(self.id_of)
            counts = collections.Counter(words)
            for word, count in counts.items():
                self.postings[word][slot] = count
                self._arrays.pop(word, None)
            self.slot_of[cid] = slot
            self.id_of.append(cid)
            self.words_of.append(tuple(counts))
            self.length_of.append(len(words))
            self.total += len(words)
        self._lengths = None

    def remove(self, drop: set[str]) -> None:
        for cid in drop.intersection(self.slot_of):
            slot = self.slot_of.pop(cid)
            for word in self.words_of[slot]:
                post = self.postings[word]
                del post[slot]
                if not post:
                    del self.postings[word]
                self._arrays.pop(word, None)
            self.id_of[slot], self.words_of[slot] = None, ()
            self.total -= self.length_of[slot]
            self.length_of[slot] = 0
        self._lengths = None

    def top(self, query: str, want: int, skip: set[str]) -> list[tuple[str, float]]:
        """The ``want`` best-scoring chunks sharing a word with ``query`` (not in ``skip``), best first."""
        n = len(self.slot_of)
        if n == 0 or want <= 0:
            return []
        if self._lengths is None:
            self._lengths = np.asarray(self.length_of, dtype=np.float64)
        norm = self.K1 * (1.0 - self.B + self.B * self._lengths / max(self.total / n, 1.0))
        scores = np.zeros(len(self.id_of))
        for word in set(_words(query)):
            post = self.postings.get(word)
            if not post:
                continue
            if word not in self._arrays:
                self._arrays[word] = (np.fromiter(post.keys(), dtype=np.int64, count=len(post)),
                                      np.fromiter(post.values(), dtype=np.float64, count=len(post)))
            slots, counts = self._arrays[word]
            idf = math.log(1.0 + (n - len(post) + 0.5) / (len(post) + 0.5))
            scores[slots] += idf * counts * (self.K1 + 1.0) / (counts + norm[slots])
        for cid in skip.intersection(self.slot_of):
            scores[self.slot_of[cid]] = 0.0
        hits = np.flatnonzero(scores)
        if len(hits) > want:
            hits = hits[np.argpartition(-scores[hits], want - 1)[:want]]
        hits = hits[np.argsort(-scores[hits], kind="stable")]
        return [(self.id_of[i], float(scores[i])) for i in hits]


class _Namespace:
    """One namespace's faiss index (row i <-> ids[i]) and lexical index. Changed only under the bank's write
    lock."""

    def __init__(self, dim: int, use_gpu: bool) -> None:
        self.dim = dim
        self.use_gpu = use_gpu
        self.lexical = _Lexical()
        self.ids: list[str] = []
        self.embeddings = np.zeros((0, dim), dtype=np.float32)
        self.tokens = 0
        self.nbytes = 0  # K-V + embeddings + texts of its chunks
        self.index = self._new_index()

    def _new_index(self) -> faiss.Index:
        index = faiss.IndexFlatIP(self.dim)
        if self.use_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def add(self, ids: list[str], vectors: np.ndarray, texts: Sequence[str]) -> None:
        self.index.add(vectors)
        self.ids.extend(ids)
        self.embeddings = np.concatenate([self.embeddings, vectors], axis=0)
        self.lexical.add(ids, texts)

    def remove(self, drop: set[str]) -> None:
        self.lexical.remove(drop)
        keep = [i for i, cid in enumerate(self.ids) if cid not in drop]
        self.ids = [self.ids[i] for i in keep]
        self.embeddings = np.ascontiguousarray(self.embeddings[keep])
        self.index = self._new_index()
        if len(keep):
            self.index.add(self.embeddings)


class MemoryBank:
    """Chunk-level K-V memory with a faiss retriever, namespaces and the paper's eviction rule.

    Args:
        embedder: turns chunk texts and queries into unit vectors (see :mod:`memlong.embedder`).
        capacity: tokens per namespace before eviction runs.
        evict_oldest: share of the oldest chunks dropped on eviction.
        keep_newest: share of the newest chunks always kept on eviction.
        dtype: dtype of stored K-V.
        device: device of stored K-V (``"cpu"`` keeps GPU memory for the model).
        pin_memory: keep CPU-stored K-V in page-locked memory, so that retrieved chunks copy to a GPU at
            full PCIe speed (needs CUDA and ``device="cpu"``).
        use_gpu_index: faiss GPU index; ``None``: when ``faiss.get_num_gpus() > 0``.
        max_bytes: bytes (K-V + embeddings + texts) the whole bank may hold; ``None``: bounded by
            ``capacity`` per namespace only. See :class:`MemoryFullError`.
        search_mode: how :meth:`search` ranks chunks when not told otherwise: ``"dense"`` (embeddings),
            ``"lexical"`` (BM25 over words) or ``"hybrid"`` (both, fused by reciprocal rank).
    """

    def __init__(self, *, embedder: TextEmbedder, capacity: int = 32_768, evict_oldest: float = 0.10,
                 keep_newest: float = 0.10, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", use_gpu_index: bool | None = None,
                 max_bytes: int | None = None, pin_memory: bool = False, search_mode: SearchMode = "dense") -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be a positive number of tokens, got {capacity}.")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}.")
        self.embedder = embedder
        self.capacity = capacity
        self.evict_oldest = evict_oldest
        self.keep_newest = keep_newest
        self.dtype = dtype
        self.device = torch.device(device)
        if pin_memory and (self.device.type != "cpu" or not torch.cuda.is_available()):
            raise ValueError("pin_memory=True pins CPU memory for copies to a GPU: it needs device='cpu' and CUDA "
                             f"(device={str(self.device)!r}, CUDA available: {torch.cuda.is_available()}). "
                             "Drop pin_memory, or use memory_device='cpu'.")
        self.pin_memory = pin_memory
        self.max_bytes = max_bytes
        self.search_mode = _check_mode(search_mode)
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.use_gpu_index = gpus > 0 if use_gpu_index is None else (use_gpu_index and gpus > 0)
        self._chunks: dict[str, Chunk] = {}
        self._spaces: dict[str, _Namespace] = {}
        self._order = itertools.count()
        self._lock = _RWLock()
        self._count_lock = threading.Lock()  # retrieval counters, bumped by concurrent readers
        self._gpu_lock = threading.Lock()  # faiss GPU indexes are not safe for concurrent searches

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the bank stores K-V: its device and dtype, contiguous, pinned if asked."""
        t = t.to(self.device, self.dtype).contiguous()
        return t.pin_memory() if self.pin_memory else t

    # ------------------------------------------------------------------ writing
    def add_chunks(self, texts: Sequence[str], *, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                   namespace: str = "default", doc_id: str | None = None,
                   spans: Sequence[tuple[int, int]] | None = None, embeddings: np.ndarray | None = None,
                   metadata: Sequence[dict[str, Any]] | None = None,
                   tokens: Sequence[Sequence[int]] | None = None) -> list[str]:
        """Store chunks (in document order) and return their new ids; evicts if the namespace overflows.

        ``keys[i]``/``values[i]``: ``(n_source_layers, n_kv_heads, tokens_i, head_dim)``, keys before RoPE.
        ``tokens[i]`` (optional): the ``tokens_i`` token ids the K-V were computed from (``MemLong`` records
        them; ``kv_refresh`` re-encodes some of them at generation).

        Raises:
            ValueError: empty text, mismatched K-V, a chunk larger than ``capacity``, a bad namespace.
            MemoryFullError: the chunks do not fit ``max_bytes`` beside the other namespaces.
        """
        n = len(texts)
        if n == 0:
            return []
        _check_namespace(namespace)
        if len(keys) != n or len(values) != n:
            raise ValueError(f"add_chunks got {n} texts but {len(keys)} keys and {len(values)} values.")
        for t, k, v in zip(texts, keys, values):
            if not isinstance(t, str) or not t.strip():
                raise ValueError("Cannot store an empty chunk text; every chunk needs text to be retrieved by.")
            if k.dim() != 4 or k.shape != v.shape:
                raise ValueError(f"chunk K-V must be (layers, kv_heads, tokens, head_dim) with equal shapes, "
                                 f"got keys {tuple(k.shape)} and values {tuple(v.shape)}.")
            if k.shape[2] > self.capacity:
                raise ValueError(f"A chunk of {k.shape[2]} tokens can never fit this bank's capacity of "
                                 f"{self.capacity} tokens per namespace; use smaller chunks or a larger capacity.")
        if spans is not None and len(spans) != n:
            raise ValueError(f"add_chunks got {n} texts but {len(spans)} spans.")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"add_chunks got {n} texts but {len(metadata)} metadata dicts.")
        if tokens is not None:
            if len(tokens) != n:
                raise ValueError(f"add_chunks got {n} texts but {len(tokens)} token lists.")
            tokens = [tuple(int(t) for t in ts) for ts in tokens]
            bad = [i for i, (ts, k) in enumerate(zip(tokens, keys)) if len(ts) != k.shape[2]]
            if bad:
                raise ValueError(f"chunk {bad[0]} has {len(tokens[bad[0]])} token ids but K-V for "
                                 f"{keys[bad[0]].shape[2]} tokens; give one id per K-V position.")
        # Everything slow happens before the write lock: embedding, normalising, converting K-V.
        if embeddings is None:
            embeddings = self.embedder.encode(list(texts))
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(n, -1)
        if vectors.shape[1] != self.embedder.dim:
            raise ValueError(f"embeddings have dimension {vectors.shape[1]}, the bank's embedder {self.embedder.dim}.")
        faiss.normalize_L2(vectors)
        doc = doc_id if doc_id is not None else secrets.token_hex(8)
        spans = list(spans) if spans is not None else [(0, int(k.shape[2])) for k in keys]
        meta = list(metadata) if metadata is not None else [{} for _ in range(n)]
        kv = [(self._place(k.detach()), self._place(v.detach())) for k, v in zip(keys, values)]
        incoming = sum(k.nbytes + v.nbytes + len(t.encode("utf-8")) for (k, v), t in zip(kv, texts))
        incoming += vectors.nbytes
        with self._lock.write():
            if self.max_bytes is not None:
                space = self._spaces.get(namespace)
                others = self._total_bytes() - (space.nbytes if space is not None else 0)
                if others + incoming > self.max_bytes:
                    raise MemoryFullError(
                        f"Cannot add {incoming} bytes to namespace {namespace!r}: the other namespaces hold "
                        f"{others} of the bank's max_bytes={self.max_bytes}. Delete or reset namespaces you no "
                        "longer need, save them to disk (MemoryBank.save) and reset them, or raise max_bytes.")
            space = self._space(namespace, create=True)
            ids = []
            for i in range(n):
                cid = secrets.token_hex(12)  # unguessable: 96 random bits
                chunk = self._chunks[cid] = Chunk(
                    id=cid, namespace=namespace, doc_id=doc, text=texts[i], span=(int(spans[i][0]), int(spans[i][1])),
                    order=next(self._order), metadata=dict(meta[i]), keys=kv[i][0], values=kv[i][1],
                    tokens=tokens[i] if tokens is not None else None)
                ids.append(cid)
                space.tokens += chunk.n_tokens
                space.nbytes += self._chunk_nbytes(chunk)
            space.add(ids, vectors, texts)
            if space.tokens > self.capacity:
                self._evict(namespace)
            if self.max_bytes is not None and self._total_bytes() > self.max_bytes:
                self._evict_bytes(namespace, protect=set(ids))
            return ids

    def delete(self, chunk_ids: Iterable[str] = (), *, namespace: str = "default", doc_id: str | None = None) -> int:
        """Delete chunks by id and/or all chunks of ``doc_id``; returns how many were removed."""
        chunk_ids = list(chunk_ids)
        with self._lock.write():
            space = self._space(namespace)
            drop = {self._get(cid, namespace).id for cid in chunk_ids}
            if doc_id is not None:
                drop |= {cid for cid in space.ids if self._chunks[cid].doc_id == doc_id}
            self._remove(namespace, drop)
            return len(drop)

    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace, or everything when ``namespace`` is None."""
        with self._lock.write():
            names = list(self._spaces) if namespace is None else [namespace]
            for name in names:
                space = self._spaces.pop(name, None)
                if space is not None:
                    for cid in space.ids:
                        del self._chunks[cid]

    # ------------------------------------------------------------------ reading
    def search(self, query: str | np.ndarray, *, namespace: str = "default", k: int = 8,
               exclude: Iterable[str] = (), count: bool = True, mode: SearchMode | None = None) -> list[SearchHit]:
        """Top-``k`` chunks of ``namespace`` for the query (text, or a vector for dense search).

        ``exclude``: ids to skip (e.g. chunks still inside the local window). ``count``: bump the
        retrieval counters that eviction uses. ``mode``: ``"dense"`` (score: inner product), ``"lexical"``
        (score: BM25; only chunks sharing a word with the query), ``"hybrid"`` (score: reciprocal rank fusion
        of both rankings); default: the bank's ``search_mode``.

        Example:
            >>> bank.search("Who keeps the iron key?", namespace="docs", k=4, mode="hybrid")
        """
        mode = _check_mode(self.search_mode if mode is None else mode)
        if k <= 0:
            return []
        if mode != "dense" and not isinstance(query, str):
            raise ValueError(f"search mode {mode!r} matches words, so it needs the query text, not a vector; pass "
                             "the text or use mode='dense'.")
        vector = None
        if mode != "lexical":
            vector = self.embedder.encode([query]) if isinstance(query, str) else np.asarray(query, np.float32)
            vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            if vector.shape[1] != self.embedder.dim:
                raise ValueError(f"query vector has dimension {vector.shape[1]}, the bank's embedder {self.embedder.dim}.")
            faiss.normalize_L2(vector)
        skip = set(exclude)
        with self._lock.read():
            space = self._spaces.get(namespace)
            if space is None or not space.ids:
                return []
            ranked: list[list[tuple[str, float]]] = []
            if vector is not None:
                # hybrid fuses rankings: look deeper than k so that chunks ranked well by one side can surface
                want = min(len(space.ids), (k if mode == "dense" else max(4 * k, 50)) + len(skip))
                if self.use_gpu_index:
                    with self._gpu_lock:
                        scores, rows = space.index.search(vector, want)
                else:
                    scores, rows = space.index.search(vector, want)
                ranked.append([(space.ids[r], float(sc)) for sc, r in zip(scores[0], rows[0])
                               if r >= 0 and space.ids[r] not in skip])
            if mode != "dense":
                lexical = space.lexical.top(query, k if mode == "lexical" else max(4 * k, 50), skip)
                ranked.append(sorted(lexical, key=lambda item: (-item[1], self._chunks[item[0]].order)))
            if mode == "hybrid":
                fused: dict[str, float] = collections.defaultdict(float)
                for ranking in ranked:
                    for rank, (cid, _) in enumerate(ranking):
                        fused[cid] += 1.0 / (_RRF_K + rank + 1)
                pairs = sorted(fused.items(), key=lambda item: (-item[1], self._chunks[item[0]].order))
            else:
                pairs = ranked[0]
            hits = [SearchHit(cid, score) for cid, score in pairs[:k]]
            if count:
                self._bump(namespace, [hit.chunk_id for hit in hits])
            return hits

    def mark_retrieved(self, chunk_ids: Iterable[str], *, namespace: str = "default") -> None:
        """Bump the retrieval counters (which eviction reads) of ``chunk_ids`` as a counted search would.

        For callers that search with ``count=False`` and then keep only some hits (e.g. one chunk per stored
        entry). Ids no longer in ``namespace`` (deleted or evicted meanwhile) are skipped.
        """
        with self._lock.read():
            self._bump(namespace, chunk_ids)

    def _bump(self, namespace: str, chunk_ids: Iterable[str]) -> None:
        with self._count_lock:  # readers hold the read lock only: counters need their own
            for cid in chunk_ids:
                chunk = self._chunks.get(cid)
                if chunk is not None and chunk.namespace == namespace:
                    chunk.retrievals += 1

    def fetch(self, chunk_ids: Sequence[str], *, namespace: str = "default", device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K-V of ``chunk_ids`` concatenated in document order: ``(n_source_layers, n_kv_heads, tokens, head_dim)``."""
        with self._lock.read():
            chunks = sorted((self._get(cid, namespace) for cid in dict.fromkeys(chunk_ids)), key=lambda c: c.order)
        if not chunks:
            raise ValueError("fetch needs at least one chunk id.")
        # Stored tensors are never written in place, so they can be concatenated outside the lock. Each chunk
        # moves to the target device first and is concatenated there: one copy of the whole, not a CPU
        # concatenation and then a second copy. (non_blocking only towards a GPU, where the concatenation
        # is ordered after the copies on the same stream; towards the CPU it would read unfinished copies.)
        device = torch.device(device) if device is not None else chunks[0].keys.device
        nb = device.type == "cuda"
        keys = torch.cat([c.keys.to(device, non_blocking=nb) for c in chunks], dim=2)
        values = torch.cat([c.values.to(device, non_blocking=nb) for c in chunks], dim=2)
        return keys.to(dtype or keys.dtype), values.to(dtype or values.dtype)

    def get(self, chunk_id: str, *, namespace: str = "default") -> Chunk:
        """The chunk ``chunk_id`` of ``namespace``; :class:`UnknownChunkError` otherwise."""
        with self._lock.read():
            return self._get(chunk_id, namespace)

    def chunk_ids(self, namespace: str = "default") -> list[str]:
        """Ids of ``namespace`` in insertion order."""
        with self._lock.read():
            space = self._spaces.get(namespace)
            return sorted(space.ids, key=lambda c: self._chunks[c].order) if space else []

    def namespaces(self) -> list[str]:
        with self._lock.read():
            return list(self._spaces)

    def num_tokens(self, namespace: str | None = None) -> int:
        with self._lock.read():
            spaces = self._spaces.values() if namespace is None else [self._spaces.get(namespace)]
            return sum(s.tokens for s in spaces if s is not None)

    def nbytes(self, namespace: str | None = None) -> int:
        """Bytes of stored K-V, embeddings and texts in one namespace or all (what ``max_bytes`` bounds)."""
        with self._lock.read():
            spaces = self._spaces.values() if namespace is None else [self._spaces.get(namespace)]
            return sum(s.nbytes for s in spaces if s is not None)

    def __len__(self) -> int:
        return len(self._chunks)

    def __repr__(self) -> str:
        limit = "" if self.max_bytes is None else f", max_bytes={self.max_bytes}"
        return (f"MemoryBank(chunks={len(self)}, tokens={self.num_tokens()}, namespaces={len(self._spaces)}, "
                f"capacity={self.capacity} tokens/namespace{limit})")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, namespaces: Sequence[str] | None = None,
             fingerprint: dict[str, Any] | None = None) -> Path:
        """Write the bank (or some ``namespaces``) to directory ``path``, atomically replacing what is there.

        Format (see :mod:`memlong.storage`): safetensors for K-V and embeddings, JSON for texts, spans,
        metadata, counters, orders, the bank's config, the embedder's name and dimension and ``fingerprint``
        (the model that made the K-V; :meth:`memlong.MemLong.save_memory` fills it in). A save that dies
        midway leaves the previous bank at ``path`` loadable. Searches and adds may run during a save; the
        saved state is the one at the call.

        Example:
            >>> bank.save("memory/alice", namespaces=["alice"])

        Raises:
            ValueError: chunk metadata that JSON cannot hold (nothing is written), or ``path`` is a file or
                a non-empty directory that is not a memory bank.
        """
        with self._lock.read():
            names = list(self._spaces) if namespaces is None else list(dict.fromkeys(namespaces))
            missing = [n for n in names if n not in self._spaces]
            if missing:
                raise ValueError(f"Cannot save namespaces {missing}: they hold no chunks.")
            tensors: list[tuple[str, torch.Tensor]] = []
            records = []
            n_chunk = 0  # K-V tensors are numbered across namespaces, as the loader reads them
            for j, name in enumerate(names):
                space = self._spaces[name]
                chunks = []
                for cid in space.ids:  # index row order: the embeddings tensor lines up with this list
                    c = self._chunks[cid]
                    tensors += [(f"k.{n_chunk}", c.keys), (f"v.{n_chunk}", c.values)]
                    n_chunk += 1
                    chunks.append({"id": c.id, "doc_id": c.doc_id, "text": c.text, "span": list(c.span),
                                   "order": c.order, "retrievals": c.retrievals, "metadata": c.metadata,
                                   "tokens": None if c.tokens is None else list(c.tokens)})
                records.append({"name": name, "chunks": chunks})
                tensors.append((f"e.{j}", torch.from_numpy(space.embeddings.copy())))
            tensors.sort(key=lambda item: item[0].startswith("e."))  # K-V first, then embeddings
            record = {
                "config": {"capacity": self.capacity, "evict_oldest": self.evict_oldest,
                           "keep_newest": self.keep_newest, "dtype": _DTYPE_NAMES.get(self.dtype, str(self.dtype)),
                           "max_bytes": self.max_bytes},
                "embedder": _embedder_info(self.embedder),
                "fingerprint": fingerprint,
                "next_order": max((c.order for c in self._chunks.values()), default=-1) + 1,
                "namespaces": records,
            }
        for rec in records:  # find unsaveable metadata before any file is touched
            for chunk in rec["chunks"]:
                try:
                    _json_check(chunk["metadata"])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"Chunk {chunk['id']} of namespace {rec['name']!r} has metadata JSON cannot "
                                     f"store ({exc}); keep metadata to str/int/float/bool/None/lists/dicts.") from None
        # Stored tensors are never written in place, so the files are written outside the lock.
        return write_bank(path, record, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder: TextEmbedder, namespaces: Sequence[str] | None = None,
             fingerprint: dict[str, Any] | None = None, **options: Any) -> MemoryBank:
        """A new bank holding what :meth:`save` wrote to ``path``.

        ``embedder`` must be the one the bank was built with (same name and dimension); the faiss indexes are
        rebuilt from the stored embeddings. ``fingerprint``: the loading model's fingerprint; any difference
        from the stored one raises :class:`MemoryMismatchError`. ``options`` override the saved constructor
        arguments (``capacity``, ``max_bytes``, ``dtype``, ``device``, ...).

        Example:
            >>> bank = MemoryBank.load("memory/alice", embedder=Embedder())

        Raises:
            MemoryFileError: missing, truncated, corrupted or unknown files (nothing is loaded).
            MemoryMismatchError: a bank made by another embedder or model (both are named).
        """
        record, tensors = read_bank(path)
        config = record.get("config")
        if not isinstance(config, dict):
            raise MemoryFileError(f"Cannot load the memory bank at {path}: its config is missing.")
        kwargs: dict[str, Any] = {k: config.get(k) for k in ("capacity", "evict_oldest", "keep_newest", "max_bytes")}
        name = config.get("dtype")
        kwargs["dtype"] = {v: k for k, v in _DTYPE_NAMES.items()}.get(name) if isinstance(name, str) else None
        kwargs.update(options)
        bad = not (_is_int(kwargs["capacity"]) and kwargs["capacity"] > 0 and isinstance(kwargs["dtype"], torch.dtype)
                   and all(isinstance(kwargs[k], (int, float)) and not isinstance(kwargs[k], bool)
                           and 0 <= kwargs[k] < 1 for k in ("evict_oldest", "keep_newest"))
                   and (kwargs["max_bytes"] is None or (_is_int(kwargs["max_bytes"]) and kwargs["max_bytes"] > 0)))
        if bad:
            raise MemoryFileError(f"Cannot load the memory bank at {path}: its config {config} is invalid.")
        bank = cls(embedder=embedder, **kwargs)
        try:
            bank._restore(Path(path), record, tensors, namespaces, fingerprint)
        except MemoryFullError as exc:
            if "max_bytes" in options:
                raise
            raise MemoryFileError(f"Cannot load the memory bank at {path}: it holds more than its own saved "
                                  f"max_bytes ({exc}); the file is inconsistent. Pass max_bytes= to override.") from None
        return bank

    def restore(self, path: str | os.PathLike, *, namespaces: Sequence[str] | None = None,
                fingerprint: dict[str, Any] | None = None) -> list[str]:
        """Load saved namespaces into this bank in place, replacing namespaces of the same name (others stay).

        This bank's own config (capacity, max_bytes, dtype, device) applies to what is loaded. Returns the
        names loaded. Raises like :meth:`load`, plus :class:`MemoryFullError` when the result would exceed
        ``max_bytes``; on any error this bank is unchanged.
        """
        record, tensors = read_bank(path)
        return self._restore(Path(path), record, tensors, namespaces, fingerprint)

    def _restore(self, path: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor],
                 namespaces: Sequence[str] | None, fingerprint: dict[str, Any] | None) -> list[str]:
        _check_compatible(path, record, self.embedder, fingerprint)
        loaded, next_order = _parse_namespaces(path, record, tensors, self.embedder.dim)
        if namespaces is not None:
            absent = [n for n in namespaces if n not in loaded]
            if absent:
                raise MemoryFileError(f"Cannot load namespaces {absent} from {path}: it holds {sorted(loaded)}.")
            loaded = {n: loaded[n] for n in namespaces}
        spaces: dict[str, _Namespace] = {}
        for name, (chunks, vectors) in loaded.items():  # build everything before touching the live bank
            space = _Namespace(self.embedder.dim, self.use_gpu_index)
            for c in chunks:
                c.namespace = name
                c.keys, c.values = self._place(c.keys), self._place(c.values)
                space.tokens += c.n_tokens
                space.nbytes += self._chunk_nbytes(c)
            space.add([c.id for c in chunks], vectors, [c.text for c in chunks])
            spaces[name] = space
        with self._lock.write():
            for name, (chunks, _) in loaded.items():
                clash = [c.id for c in chunks if c.id in self._chunks and self._chunks[c.id].namespace != name]
                if clash:
                    raise MemoryFileError(f"Cannot load namespace {name!r} from {path}: chunk id {clash[0]} is "
                                          "already used by another namespace of this bank (was this bank loaded twice "
                                          "under different names?).")
            if self.max_bytes is not None:
                total = self._total_bytes() + sum(s.nbytes for s in spaces.values())
                total -= sum(self._spaces[n].nbytes for n in spaces if n in self._spaces)
                if total > self.max_bytes:
                    raise MemoryFullError(f"Loading {path} would make the bank hold {total} bytes, over its "
                                          f"max_bytes={self.max_bytes}. Reset namespaces first or raise max_bytes.")
            for name, space in spaces.items():
                old = self._spaces.pop(name, None)
                for cid in old.ids if old is not None else ():
                    del self._chunks[cid]
                self._spaces[name] = space
                self._chunks.update((c.id, c) for c in loaded[name][0])
                if space.tokens > self.capacity:
                    self._evict(name)  # a smaller capacity than the saving bank's: the usual rule applies
            nxt = next(self._order)
            self._order = itertools.count(max(nxt, next_order))
        return list(spaces)

    # ---------------------------------------------------------------- internals
    def _space(self, namespace: str, create: bool = False) -> _Namespace:
        _check_namespace(namespace)
        space = self._spaces.get(namespace)
        if space is None:
            if not create:
                # Other namespaces are not listed: their names belong to other users.
                raise KeyError(f"Namespace {namespace!r} does not exist: nothing was ever stored in it, or it "
                               "was reset.")
            space = self._spaces[namespace] = _Namespace(self.embedder.dim, self.use_gpu_index)
        return space

    def _get(self, chunk_id: str, namespace: str) -> Chunk:
        chunk = self._chunks.get(chunk_id) if isinstance(chunk_id, str) else None
        if chunk is None or chunk.namespace != namespace:
            # Same message whether it never existed or lives elsewhere: namespaces leak nothing.
            raise UnknownChunkError(
                f"Chunk id {chunk_id!r} is not in namespace {namespace!r}: it was never stored there, or it was "
                "deleted or evicted. Use ids returned by search()/ingest() for the same namespace.")
        return chunk

    def _chunk_nbytes(self, chunk: Chunk) -> int:
        return chunk.keys.nbytes + chunk.values.nbytes + 4 * self.embedder.dim + len(chunk.text.encode("utf-8"))

    def _total_bytes(self) -> int:
        return sum(s.nbytes for s in self._spaces.values())

    def _remove(self, namespace: str, drop: set[str]) -> None:
        if not drop:
            return
        space = self._spaces[namespace]
        for cid in drop:
            chunk = self._chunks.pop(cid)
            space.tokens -= chunk.n_tokens
            space.nbytes -= self._chunk_nbytes(chunk)
        space.remove(drop)

    def _eviction_order(self, namespace: str) -> tuple[list[Chunk], list[Chunk], list[Chunk]]:
        """(oldest share, middle sorted least-retrieved first, newest share) of a namespace."""
        chunks = sorted((self._chunks[c] for c in self._spaces[namespace].ids), key=lambda c: c.order)
        n = len(chunks)
        n_old = int(round(n * self.evict_oldest))
        n_new = int(round(n * self.keep_newest))
        middle = sorted(chunks[n_old:n - n_new], key=lambda c: (c.retrievals, c.order))
        return chunks[:n_old], middle, chunks[n - n_new:] if n_new else []

    def _evict(self, namespace: str) -> None:
        """The paper's rule: oldest share out, newest share kept, least-retrieved in between."""
        space = self._spaces[namespace]
        oldest, middle, _ = self._eviction_order(namespace)
        drop = {c.id for c in oldest}
        tokens = space.tokens - sum(c.n_tokens for c in oldest)
        target = self.capacity // 2
        for chunk in middle:
            if tokens <= target:
                break
            drop.add(chunk.id)
            tokens -= chunk.n_tokens
        _warn_evicted(namespace, len(drop), f"memory_capacity={self.capacity} tokens",
                      "raise memory_capacity (MemLongConfig / MemoryBank(capacity=...))")
        self._remove(namespace, drop)

    def _evict_bytes(self, namespace: str, protect: set[str]) -> None:
        """Over ``max_bytes``: evict in ``namespace`` only, in the rule's order, until the whole bank fits."""
        assert self.max_bytes is not None
        oldest, middle, newest = self._eviction_order(namespace)
        excess = self._total_bytes() - self.max_bytes
        drop = set()
        for chunk in [*oldest, *middle, *newest]:
            if excess <= 0:
                break
            if chunk.id not in protect:
                drop.add(chunk.id)
                excess -= self._chunk_nbytes(chunk)
        _warn_evicted(namespace, len(drop), f"max_bytes={self.max_bytes}", "raise max_bytes or reset other namespaces")
        self._remove(namespace, drop)


# ------------------------------------------------------------------ helpers
def _warn_evicted(namespace: str, n: int, limit: str, fix: str) -> None:
    if n:
        warnings.warn(f"Namespace {namespace!r} outgrew {limit}: evicted {n} chunks (oldest share first, then the "
                      f"least retrieved; the paper's rule). To keep every chunk, {fix}.",
                      MemoryEvictionWarning, stacklevel=4)


def _check_mode(mode: Any) -> SearchMode:
    if mode not in ("dense", "lexical", "hybrid"):
        raise ValueError(f"search mode must be 'dense', 'lexical' or 'hybrid', got {mode!r}.")
    return mode


def _check_namespace(namespace: Any) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty string, got {namespace!r}.")


def _is_int(x: Any) -> bool:
    return type(x) is int


def _embedder_info(embedder: TextEmbedder) -> dict[str, Any]:
    return {"name": str(getattr(embedder, "name", None) or type(embedder).__qualname__), "dim": int(embedder.dim)}


def _json_check(value: Any, depth: int = 0) -> None:
    """Raise TypeError/ValueError unless ``value`` survives a JSON round trip unchanged in kind."""
    if depth > 32:
        raise ValueError("nested deeper than 32 levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value}")
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _json_check(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"key {k!r} is not a string")
            _json_check(v, depth + 1)
        return
    raise TypeError(f"value of type {type(value).__name__}")


def _describe(info: Any) -> str:
    if not isinstance(info, dict):
        return repr(info)
    return ", ".join(f"{k}={v}" for k, v in info.items())


def _check_compatible(path: Path, record: dict[str, Any], embedder: TextEmbedder,
                      fingerprint: dict[str, Any] | None) -> None:
    """Refuse a bank made by another embedder or (when ``fingerprint`` is given) another model/config."""
    stored_emb, mine = record.get("embedder"), _embedder_info(embedder)
    if stored_emb != mine:
        raise MemoryMismatchError(
            f"The memory bank at {path} was built with the embedder {_describe(stored_emb)}, but it is being loaded "
            f"with {_describe(mine)}. Load it with the embedder that built it (its vectors are not comparable "
            "across embedders), or re-ingest the documents.")
    if fingerprint is None:
        return
    stored = record.get("fingerprint")
    if not isinstance(stored, dict):
        raise MemoryMismatchError(f"The memory bank at {path} records no model fingerprint ({stored!r}), but this "
                                  f"model is {_describe(fingerprint)}: it was not saved by MemLong.save_memory, so "
                                  "its K-V cannot be checked. Load it with MemoryBank.load instead.")
    keys = sorted(set(stored) | set(fingerprint), key=lambda k: (k in _INFO_KEYS, k))
    differ = [k for k in keys if k not in _INFO_KEYS and stored.get(k) != fingerprint.get(k)]
    if differ:
        raise MemoryMismatchError(
            f"The memory bank at {path} was made by a different model or config: "
            + "; ".join(f"{k}: saved {stored.get(k)!r}, this model {fingerprint.get(k)!r}" for k in differ)
            + f". Saved: {_describe(stored)}. This model: {_describe(fingerprint)}. Load it with the model and "
            "config that built it, or re-ingest the documents with this one.")
    for k in _INFO_KEYS:
        if stored.get(k) != fingerprint.get(k):
            warnings.warn(f"The memory bank at {path} was saved from model {stored.get(k)!r}, loading into "
                          f"{fingerprint.get(k)!r}; the shapes agree, so this is fine if both are the same weights.",
                          stacklevel=4)


def _parse_namespaces(path: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor],
                      dim: int) -> tuple[dict[str, tuple[list[Chunk], np.ndarray]], int]:
    """Validate every field of a saved record against its tensors; returns namespaces and the next order."""

    def bad(problem: str) -> MemoryFileError:
        return MemoryFileError(f"Cannot load the memory bank at {path}: {problem} The files are corrupted or were "
                               "not written by memlong.")

    spaces, next_order = record.get("namespaces"), record.get("next_order")
    if not isinstance(spaces, list) or not _is_int(next_order) or next_order < 0:
        raise bad("'namespaces' or 'next_order' is missing or malformed.")
    out: dict[str, tuple[list[Chunk], np.ndarray]] = {}
    seen_ids: set[str] = set()
    seen_orders: set[int] = set()
    used = set()
    n_chunk = 0
    for j, space in enumerate(spaces):
        if not isinstance(space, dict) or not isinstance(space.get("name"), str) or not space["name"]:
            raise bad(f"namespace entry {j} is malformed.")
        name, items = space["name"], space.get("chunks")
        if name in out or not isinstance(items, list):
            raise bad(f"namespace {name[:100]!r} is duplicated or malformed.")
        chunks = []
        for c in items:
            ok = (isinstance(c, dict) and isinstance(c.get("id"), str) and _CHUNK_ID.match(c["id"])
                  and isinstance(c.get("doc_id"), str) and isinstance(c.get("text"), str) and c["text"].strip()
                  and isinstance(c.get("span"), list) and len(c["span"]) == 2 and all(map(_is_int, c["span"]))
                  and 0 <= c["span"][0] <= c["span"][1] and _is_int(c.get("order")) and 0 <= c["order"] < next_order
                  and _is_int(c.get("retrievals")) and c["retrievals"] >= 0 and isinstance(c.get("metadata"), dict)
                  and (c.get("tokens") is None or (isinstance(c["tokens"], list)
                                                 and all(_is_int(t) and t >= 0 for t in c["tokens"]))))
            if not ok:
                raise bad(f"chunk record {n_chunk} of namespace {name[:100]!r} is malformed ({str(c)[:200]}).")
            if c["id"] in seen_ids or c["order"] in seen_orders:
                raise bad(f"chunk id {c['id']} or its order {c['order']} appears twice.")
            seen_ids.add(c["id"])
            seen_orders.add(c["order"])
            k, v = tensors.get(f"k.{n_chunk}"), tensors.get(f"v.{n_chunk}")
            if k is None or v is None or k.dim() != 4 or k.shape != v.shape or not k.is_floating_point() \
                    or k.dtype != v.dtype:
                raise bad(f"the K-V of chunk {c['id']} are missing or malformed.")
            if c.get("tokens") is not None and len(c["tokens"]) != k.shape[2]:
                raise bad(f"chunk {c['id']} has {len(c['tokens'])} token ids for K-V of {k.shape[2]} tokens.")
            used |= {f"k.{n_chunk}", f"v.{n_chunk}"}
            chunks.append(Chunk(id=c["id"], namespace=name, doc_id=c["doc_id"], text=c["text"],
                                span=(c["span"][0], c["span"][1]), order=c["order"], keys=k, values=v,
                                retrievals=c["retrievals"], metadata=c["metadata"],
                                tokens=None if c.get("tokens") is None else tuple(c["tokens"])))
            n_chunk += 1
        emb = tensors.get(f"e.{j}")
        if emb is None or emb.dtype != torch.float32 or tuple(emb.shape) != (len(chunks), dim):
            raise bad(f"the embeddings of namespace {name[:100]!r} are missing or not ({len(chunks)}, {dim}) float32.")
        vectors = np.ascontiguousarray(emb.numpy(), dtype=np.float32)
        with np.errstate(all="ignore"):
            unit = np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        if not unit:
            raise bad(f"the embeddings of namespace {name[:100]!r} are not unit vectors.")
        used.add(f"e.{j}")
        out[name] = (chunks, vectors)
    extra = set(tensors) - used
    if extra:
        raise bad(f"the tensor file holds unexpected tensors ({sorted(extra)[:3]}).")
    return out, next_order
