"""How a :class:`~memlong.memory.MemoryBank` add is checked and planned before anything changes.

Contract:
    * :meth:`BankWrites._prepare` (outside the lock, the slow part): every chunk checked by the rules of
      :mod:`memlong.records` (K-V in the bank's dtype), K-V converted, embeddings computed and normalised.
    * :meth:`BankWrites._check_shapes` / :meth:`BankWrites._plan` (under the write lock): the K-V shape of the
      namespace is kept, and the evictions that make room (capacity, then ``max_bytes``) are chosen, or the add
      is refused with :class:`~memlong.eviction.MemoryFullError` / ``ValueError``, before the bank changes.

:class:`BankWrites` is a mixin: these methods belong to :class:`MemoryBank` and use its internals.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch

from memlong.eviction import MemoryFullError, bytes_victims, capacity_victims
from memlong.records import Chunk, check_chunk, check_embeddings
from memlong.search import NamespaceIndex

__all__ = ["STAGING", "STAGING_PREFIX", "BankWrites", "check_doc_id", "is_staging"]

STAGING_PREFIX = "_memlong-staging-"  # transient namespaces of memlong.upsert.ingest_entries
STAGING: set[str] = set()  # those in use now: an upsert raises its own clear error, so they evict without a warning


def check_doc_id(doc_id: Any) -> None:
    """ValueError unless ``doc_id`` is None or a string (``add_chunks`` / ``delete``)."""
    if doc_id is not None and not isinstance(doc_id, str):
        raise ValueError(f"doc_id must be a string, got {type(doc_id).__name__} {str(doc_id)[:50]!r}.")


def is_staging(namespace: str) -> bool:
    """A namespace an upsert is staging its entries in right now (not a user's namespace of a similar name): it is
    not listed, saved, reset with the rest, written to a disk bank's segments, or counted against other adds."""
    return namespace in STAGING


class BankWrites:
    """The checking and planning half of :meth:`MemoryBank.add_chunks` (see the module docstring)."""

    def _prepare(self, texts: Sequence[str], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 doc_id: str | Sequence[str] | None, spans: Sequence[tuple[int, int]] | None, embeddings: np.ndarray | None,
                 metadata: Sequence[dict[str, Any]] | None,
                 tokens: Sequence[Sequence[int]] | None) -> tuple[list[Chunk], np.ndarray]:
        """Validate and convert chunks outside the lock (the slow part of an add): chunks without namespace
        and order, and their unit embeddings."""
        n = len(texts)
        many = doc_id if doc_id is not None and not isinstance(doc_id, str) else None
        for name, given in (("keys", keys), ("values", values), ("spans", spans), ("metadata dicts", metadata),
                            ("token lists", tokens), ("doc_ids", many)):
            if given is not None and len(given) != n:
                raise ValueError(f"add_chunks got {n} texts but {len(given)} {name}.")
        one = doc_id if many is None and doc_id is not None else secrets.token_hex(8)
        chunks = []
        for i in range(n):
            doc = many[i] if many is not None else one
            k, v = keys[i], values[i]
            if isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[2] > self.capacity:
                raise ValueError(f"A chunk of {k.shape[2]} tokens can never fit this bank's capacity of "
                                 f"{self.capacity} tokens per namespace; use smaller chunks or a larger capacity.")
            if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4 and \
                    k.is_floating_point() and v.is_floating_point():  # integer K-V are refused, not cast to 0/1
                k, v = self._place(k.detach()), self._place(v.detach())  # checked in the bank's dtype
            try:
                span, meta, ids = check_chunk(text=texts[i], doc_id=doc, keys=k, values=v,
                                              span=spans[i] if spans is not None else (0, int(k.shape[2])),
                                              metadata=metadata[i] if metadata is not None else None,
                                              tokens=tokens[i] if tokens is not None else None)
            except ValueError as exc:
                raise ValueError(f"add_chunks: chunk {i}: {exc}") from None
            chunks.append(Chunk(id=secrets.token_hex(12), namespace="", doc_id=doc, text=texts[i], span=span,
                                order=-1, kv=self._store.encode(k, v), metadata=meta, tokens=ids))  # id: 96 random bits
        if n and embeddings is None:
            embeddings = self.embedder.encode(list(texts))
        if isinstance(embeddings, torch.Tensor):  # numpy cannot read a bfloat16 tensor
            embeddings = embeddings.detach().float().cpu().numpy()
        vectors = np.ascontiguousarray(embeddings if n else np.zeros((0, self.embedder.dim)), dtype=np.float32)
        if vectors.size != n * self.embedder.dim:
            raise ValueError(f"embeddings hold {vectors.shape} values for {n} chunks of dimension "
                             f"{self.embedder.dim} (the bank's embedder).")
        vectors = vectors.reshape(n, self.embedder.dim)
        faiss.normalize_L2(vectors)
        check_embeddings(vectors)
        return chunks, vectors

    def _check_shapes(self, namespace: str, new: list[Chunk], drop: set[str]) -> None:
        """Every chunk of a namespace has K-V of one (layers, kv_heads, head_dim), or fetch could not join them."""
        space = self._spaces.get(namespace)
        ref = next((self._chunks[c].kv.shape for c in (space.ids if space else ()) if c not in drop), None)
        ref = ref if ref is not None else (new[0].kv.shape if new else None)
        for c in new:
            if (c.kv.shape[:2], c.kv.shape[3]) != (ref[:2], ref[3]):
                raise ValueError(f"chunk K-V of shape {tuple(c.kv.shape)} cannot join namespace {namespace!r}, "
                                 f"whose chunks have shape (layers, kv_heads, tokens, head_dim) = {tuple(ref)}; "
                                 "use one model and config per namespace.")

    def _plan(self, namespace: str, space: NamespaceIndex | None, drop: set[str], new: list[Chunk],
              sizes: dict[str, int], protect: bool) -> tuple[set[str], set[str]]:
        """Ids to evict (for capacity, for bytes) so that the namespace's chunks less ``drop``, plus ``new``, fit;
        raises when they cannot. Without a limit to meet it reads the namespace's totals only (listing and summing
        every chunk on each add made a long ingest quadratic: 55 ms per 7-chunk add at 40k chunks)."""
        tokens = (space.tokens if space else 0) + sum(c.n_tokens for c in new) - sum(
            self._chunks[c].n_tokens for c in drop)
        held = (space.nbytes if space else 0) + sum(sizes.values()) - sum(self._sizes[c] for c in drop)
        if tokens <= self.capacity and (self.max_bytes is None or is_staging(namespace) or held + sum(
                s.nbytes for n, s in self._visible().items() if n != namespace) <= self.max_bytes):
            return set(), set()
        kept = [self._chunks[cid] for cid in (space.ids if space else ()) if cid not in drop]
        shield = {c.id for c in new} if protect else set()
        cap = capacity_victims([*kept, *new], self.capacity, self.evict_oldest, self.keep_newest, shield)
        rest = [c for c in [*kept, *new] if c.id not in cap]
        if sum(c.n_tokens for c in rest) > self.capacity:
            raise ValueError(f"The {sum(c.n_tokens for c in new)} tokens written to namespace {namespace!r} in one "
                             f"atomic write (replace= or atomic=True) do not fit its capacity of {self.capacity} "
                             "tokens; nothing was changed. Write fewer or smaller chunks, or raise the capacity.")
        if self.max_bytes is None or is_staging(namespace):  # a staging space is checked by the add that empties it
            return cap, set()
        others = sum(s.nbytes for n, s in self._visible().items() if n != namespace)
        incoming = sum(sizes.values())
        if incoming > self.max_bytes:
            raise MemoryFullError(
                f"One write of {incoming} bytes to namespace {namespace!r} is larger than the bank's whole "
                f"max_bytes={self.max_bytes}; nothing was changed. Write fewer chunks at a time (an ingest writes one "
                "step's chunks at once: lower MemLongConfig.ingest_step) or raise max_bytes.")
        if others + incoming > self.max_bytes:
            raise MemoryFullError(
                f"Cannot add {incoming} bytes to namespace {namespace!r}: the other namespaces hold the rest of the "
                f"bank's max_bytes={self.max_bytes}. Delete or reset namespaces you no longer need, save them to "
                "disk (MemoryBank.save) and reset them, or raise max_bytes.")
        def size(c: Chunk) -> int:
            return sizes[c.id] if c.id in sizes else self._sizes[c.id]

        excess = others + sum(map(size, rest)) - self.max_bytes
        evict = bytes_victims(rest, excess, size, self.evict_oldest, self.keep_newest, {c.id for c in new})
        if excess - sum(size(c) for c in rest if c.id in evict) > 0:
            raise MemoryFullError(f"The {incoming} bytes written to namespace {namespace!r} do not fit the bank's "
                                  f"max_bytes={self.max_bytes} even alone; nothing was changed. Write smaller chunks "
                                  "(or less metadata), or raise max_bytes.")
        return cap, evict
