"""`MemoryBank` (Ret-Mem): chunk texts, retriever embeddings and the chunks' stored K-V.

Contract:
    * A chunk is ``chunk_size`` (or fewer) consecutive tokens of one document. For every chunk the
      bank keeps: an unguessable id, its namespace, document id, text, token span, a unit-norm
      retriever embedding, a retrieval counter, and the keys (before RoPE) and values of each
      *source layer*: ``keys``/``values`` of shape ``(n_source_layers, n_kv_heads, tokens, head_dim)``.
    * Namespaces are hard boundaries: each has its own faiss inner-product index, its own capacity
      and its own eviction; every call that takes chunk ids also takes the caller's namespace and
      refuses ids that live elsewhere.
    * Row ``i`` of a namespace's faiss index is always chunk ``ids[i]``: every removal rebuilds the
      index from the kept embeddings, so K-V, texts and index cannot drift apart.
    * Eviction (when a namespace exceeds ``capacity`` tokens): drop the oldest ``evict_oldest`` share,
      keep the newest ``keep_newest`` share, and between them evict the least-retrieved chunks (oldest
      first on ties) until at most half the capacity is used.

Example:
    >>> bank = MemoryBank(embedder=Embedder(), capacity=32768)
    >>> ids = bank.add_chunks(["To be, or not to be"], keys=[k], values=[v], namespace="hamlet")
    >>> hits = bank.search("famous question", namespace="hamlet", k=1)
    >>> keys, values = bank.fetch([h.chunk_id for h in hits], namespace="hamlet")
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch

from memlong.embedder import TextEmbedder

__all__ = ["Chunk", "MemoryBank", "SearchHit", "UnknownChunkError"]


class UnknownChunkError(KeyError):
    """A chunk id that does not exist in the caller's namespace (never created, deleted, evicted, or another's)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


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

    @property
    def n_tokens(self) -> int:
        return int(self.keys.shape[2])


@dataclass(frozen=True)
class SearchHit:
    chunk_id: str
    score: float


class _Namespace:
    """One namespace's faiss index; row i <-> ids[i]."""

    def __init__(self, dim: int, use_gpu: bool) -> None:
        self.dim = dim
        self.use_gpu = use_gpu
        self.ids: list[str] = []
        self.embeddings = np.zeros((0, dim), dtype=np.float32)
        self.tokens = 0
        self.index = self._new_index()

    def _new_index(self) -> faiss.Index:
        index = faiss.IndexFlatIP(self.dim)
        if self.use_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        self.index.add(vectors)
        self.ids.extend(ids)
        self.embeddings = np.concatenate([self.embeddings, vectors], axis=0)

    def remove(self, drop: set[str]) -> None:
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
        use_gpu_index: faiss GPU index; ``None``: when ``faiss.get_num_gpus() > 0``.
    """

    def __init__(self, *, embedder: TextEmbedder, capacity: int = 32_768, evict_oldest: float = 0.10,
                 keep_newest: float = 0.10, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", use_gpu_index: bool | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be a positive number of tokens, got {capacity}.")
        self.embedder = embedder
        self.capacity = capacity
        self.evict_oldest = evict_oldest
        self.keep_newest = keep_newest
        self.dtype = dtype
        self.device = torch.device(device)
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.use_gpu_index = gpus > 0 if use_gpu_index is None else (use_gpu_index and gpus > 0)
        self._chunks: dict[str, Chunk] = {}
        self._spaces: dict[str, _Namespace] = {}
        self._order = itertools.count()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ writing
    def add_chunks(self, texts: Sequence[str], *, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                   namespace: str = "default", doc_id: str | None = None,
                   spans: Sequence[tuple[int, int]] | None = None, embeddings: np.ndarray | None = None,
                   metadata: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Store chunks (in document order) and return their new ids; evicts if the namespace overflows.

        ``keys[i]``/``values[i]``: ``(n_source_layers, n_kv_heads, tokens_i, head_dim)``, keys before RoPE.
        """
        n = len(texts)
        if n == 0:
            return []
        if len(keys) != n or len(values) != n:
            raise ValueError(f"add_chunks got {n} texts but {len(keys)} keys and {len(values)} values.")
        for t, k, v in zip(texts, keys, values):
            if not isinstance(t, str) or not t.strip():
                raise ValueError("Cannot store an empty chunk text; every chunk needs text to be retrieved by.")
            if k.dim() != 4 or k.shape != v.shape:
                raise ValueError(f"chunk K-V must be (layers, kv_heads, tokens, head_dim) with equal shapes, "
                                 f"got keys {tuple(k.shape)} and values {tuple(v.shape)}.")
        if embeddings is None:
            embeddings = self.embedder.encode(list(texts))
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(n, -1)
        if vectors.shape[1] != self.embedder.dim:
            raise ValueError(f"embeddings have dimension {vectors.shape[1]}, the bank's embedder {self.embedder.dim}.")
        faiss.normalize_L2(vectors)
        doc = doc_id if doc_id is not None else secrets.token_hex(8)
        spans = list(spans) if spans is not None else [(0, int(k.shape[2])) for k in keys]
        meta = list(metadata) if metadata is not None else [{} for _ in range(n)]
        with self._lock:
            space = self._space(namespace, create=True)
            ids = []
            for i in range(n):
                cid = secrets.token_hex(12)  # unguessable: 96 random bits
                self._chunks[cid] = Chunk(
                    id=cid, namespace=namespace, doc_id=doc, text=texts[i], span=(int(spans[i][0]), int(spans[i][1])),
                    order=next(self._order), metadata=dict(meta[i]),
                    keys=keys[i].detach().to(self.device, self.dtype).contiguous(),
                    values=values[i].detach().to(self.device, self.dtype).contiguous())
                ids.append(cid)
                space.tokens += self._chunks[cid].n_tokens
            space.add(ids, vectors)
            if space.tokens > self.capacity:
                self._evict(namespace)
            return ids

    def delete(self, chunk_ids: Iterable[str] = (), *, namespace: str = "default", doc_id: str | None = None) -> int:
        """Delete chunks by id and/or all chunks of ``doc_id``; returns how many were removed."""
        with self._lock:
            space = self._space(namespace)
            drop = {self._get(cid, namespace).id for cid in chunk_ids}
            if doc_id is not None:
                drop |= {cid for cid in space.ids if self._chunks[cid].doc_id == doc_id}
            self._remove(namespace, drop)
            return len(drop)

    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace, or everything when ``namespace`` is None."""
        with self._lock:
            names = list(self._spaces) if namespace is None else [namespace]
            for name in names:
                space = self._spaces.pop(name, None)
                if space is not None:
                    for cid in space.ids:
                        del self._chunks[cid]

    # ------------------------------------------------------------------ reading
    def search(self, query: str | np.ndarray, *, namespace: str = "default", k: int = 8,
               exclude: Iterable[str] = (), count: bool = True) -> list[SearchHit]:
        """Top-``k`` chunks of ``namespace`` by inner product with the query (text or vector).

        ``exclude``: ids to skip (e.g. chunks still inside the local window). ``count``: bump the
        retrieval counters that eviction uses.
        """
        if k <= 0:
            return []
        vector = self.embedder.encode([query]) if isinstance(query, str) else np.asarray(query, np.float32)
        vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        faiss.normalize_L2(vector)
        skip = set(exclude)
        with self._lock:
            space = self._spaces.get(namespace)
            if space is None or not space.ids:
                return []
            want = min(len(space.ids), k + len(skip))
            scores, rows = space.index.search(vector, want)
            hits = [SearchHit(space.ids[r], float(s)) for s, r in zip(scores[0], rows[0])
                    if r >= 0 and space.ids[r] not in skip][:k]
            if count:
                for hit in hits:
                    self._chunks[hit.chunk_id].retrievals += 1
            return hits

    def fetch(self, chunk_ids: Sequence[str], *, namespace: str = "default", device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K-V of ``chunk_ids`` concatenated in document order: ``(n_source_layers, n_kv_heads, tokens, head_dim)``."""
        with self._lock:
            chunks = sorted((self._get(cid, namespace) for cid in dict.fromkeys(chunk_ids)), key=lambda c: c.order)
            if not chunks:
                raise ValueError("fetch needs at least one chunk id.")
            keys = torch.cat([c.keys for c in chunks], dim=2)
            values = torch.cat([c.values for c in chunks], dim=2)
        return keys.to(device or keys.device, dtype or keys.dtype), values.to(device or values.device, dtype or values.dtype)

    def get(self, chunk_id: str, *, namespace: str = "default") -> Chunk:
        """The chunk ``chunk_id`` of ``namespace``; :class:`UnknownChunkError` otherwise."""
        with self._lock:
            return self._get(chunk_id, namespace)

    def chunk_ids(self, namespace: str = "default") -> list[str]:
        """Ids of ``namespace`` in insertion order."""
        with self._lock:
            space = self._spaces.get(namespace)
            return sorted(space.ids, key=lambda c: self._chunks[c].order) if space else []

    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._spaces)

    def num_tokens(self, namespace: str | None = None) -> int:
        with self._lock:
            spaces = self._spaces.values() if namespace is None else [self._spaces.get(namespace)]
            return sum(s.tokens for s in spaces if s is not None)

    def nbytes(self, namespace: str | None = None) -> int:
        """Bytes of stored K-V (and embeddings) in one namespace or all."""
        with self._lock:
            total = 0
            for name, space in self._spaces.items():
                if namespace is None or name == namespace:
                    total += space.embeddings.nbytes
                    total += sum(self._chunks[c].keys.nbytes + self._chunks[c].values.nbytes for c in space.ids)
            return total

    def __len__(self) -> int:
        return len(self._chunks)

    def __repr__(self) -> str:
        return (f"MemoryBank(chunks={len(self)}, tokens={self.num_tokens()}, namespaces={len(self._spaces)}, "
                f"capacity={self.capacity} tokens/namespace)")

    # ---------------------------------------------------------------- internals
    def _space(self, namespace: str, create: bool = False) -> _Namespace:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}.")
        space = self._spaces.get(namespace)
        if space is None:
            if not create:
                raise KeyError(f"Namespace {namespace!r} does not exist (known: {sorted(self._spaces)}).")
            space = self._spaces[namespace] = _Namespace(self.embedder.dim, self.use_gpu_index)
        return space

    def _get(self, chunk_id: str, namespace: str) -> Chunk:
        chunk = self._chunks.get(chunk_id)
        if chunk is None or chunk.namespace != namespace:
            # Same message whether it never existed or lives elsewhere: namespaces leak nothing.
            raise UnknownChunkError(
                f"Chunk id {chunk_id!r} is not in namespace {namespace!r}: it was never stored there, or it was "
                "deleted or evicted. Use ids returned by search()/ingest() for the same namespace.")
        return chunk

    def _remove(self, namespace: str, drop: set[str]) -> None:
        if not drop:
            return
        space = self._spaces[namespace]
        for cid in drop:
            space.tokens -= self._chunks.pop(cid).n_tokens
        space.remove(drop)

    def _evict(self, namespace: str) -> None:
        """The paper's rule: oldest share out, newest share kept, least-retrieved in between."""
        space = self._spaces[namespace]
        chunks = sorted((self._chunks[c] for c in space.ids), key=lambda c: c.order)
        n = len(chunks)
        n_old = int(round(n * self.evict_oldest))
        n_new = int(round(n * self.keep_newest))
        drop = {c.id for c in chunks[:n_old]}
        tokens = space.tokens - sum(c.n_tokens for c in chunks[:n_old])
        middle = sorted(chunks[n_old:n - n_new], key=lambda c: (c.retrievals, c.order))
        target = self.capacity // 2
        for chunk in middle:
            if tokens <= target:
                break
            drop.add(chunk.id)
            tokens -= chunk.n_tokens
        self._remove(namespace, drop)
