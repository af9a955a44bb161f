"""The fast tier above the bank: recently read chunks' K-V kept on the model's device (issue 21).

A bank in CPU memory (pinned or not) or on disk copies every retrieved chunk to the GPU on every query; at
32 x 1,024 retrieved tokens that copy made K-V injection slower than re-encoding the text on an H100
(docs/benchmarks-gpu.md). :class:`DeviceCache` keeps the K-V of the chunks read most recently on the model's
device, least recently read evicted first, within a byte budget, so a chunk read again (a follow-up question, a
popular document) is not copied again; a read larger than the whole budget keeps its first chunks, so that
repeating it copies only the rest. It is what ``MemLongConfig(memory_device="auto")`` (the default) sets up
on CUDA: the bank in pinned CPU memory (or on disk with ``memory_path``) below, ``memory_cache_bytes`` on the GPU
above. On a CPU-only model ``"auto"`` is ``"cpu"`` and there is no cache.

The cache never changes what is read: an entry is used only while the bank still holds the very payload it was
copied from (a chunk deleted, evicted, re-ingested or loaded again has a new payload object, and its stale entry
is replaced on the next read or aged out), and in the dtype asked for; the K-V are then the same tensors, bit for
bit, as :meth:`memlong.memory.MemoryBank.fetch` returns (tests/test_kv_cache.py).

Example:
    >>> cache = DeviceCache("cuda", max_bytes=2 << 30)
    >>> keys, values = cache.fetch(ml.bank, chunk_ids, "docs", dtype=torch.bfloat16)
    >>> cache.hits, cache.misses, cache.nbytes
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from memlong.memory import MemoryBank
    from memlong.records import Chunk

__all__ = ["DeviceCache"]


@dataclass
class _Entry:
    source: weakref.ref  # the bank payload the tensors were copied from
    dtype: torch.dtype | None  # the dtype asked for (None: as stored)
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class DeviceCache:
    """An LRU of chunk K-V on ``device`` holding at most ``max_bytes`` (see the module docstring).

    Attributes:
        hits / misses: chunk reads served from the cache / copied from the bank since creation (or ``clear``).
    """

    def __init__(self, device: str | torch.device, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"DeviceCache needs max_bytes as an integer > 0, got {max_bytes!r}.")
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # least recently read first
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of K-V the cache holds now."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and zero the counters (the next reads copy from the bank: a cold cache)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = self.hits = self.misses = 0

    def fetch(self, bank: MemoryBank, chunk_ids: Sequence[str], namespace: str,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``bank.fetch(chunk_ids, namespace=namespace, dtype=dtype)`` on this cache's device, served from the cache
        where it can be: K-V of ``chunk_ids`` in document order, ``(n_source_layers, n_kv_heads, tokens,
        head_dim)``, a new tensor (callers may write to it).

        Raises:
            memlong.memory.UnknownChunkError: an id not in ``namespace`` (nothing is cached or evicted).
        """
        return bank.fetch(chunk_ids, namespace=namespace, dtype=dtype, cache=self)

    def read(self, namespace: str, chunks: Sequence[Chunk], dtype: torch.dtype | None,
             copy: Callable[[Chunk], tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each of ``chunks``' K-V on this device in ``dtype``: the cached entry, else ``copy(chunk)`` (the bank's
        copy to this device), converted and cached. Called by :meth:`MemoryBank.fetch` with the chunks it looked up."""
        parts = []
        with self._lock:
            for chunk in chunks:
                key = (namespace, chunk.id)
                entry = self._entries.get(key)
                if entry is not None and entry.source() is chunk.kv and entry.dtype == dtype:
                    self._entries.move_to_end(key)
                    self.hits += 1
                else:
                    keys, values = copy(chunk)
                    entry = _Entry(weakref.ref(chunk.kv), dtype, keys.to(dtype or keys.dtype),
                                   values.to(dtype or values.dtype))
                    self._put(key, entry)
                    self.misses += 1
                parts.append((entry.keys, entry.values))
            self._evict({(namespace, c.id) for c in chunks})
        return parts

    def _put(self, key: tuple[str, str], entry: _Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._entries[key] = entry
        self._nbytes += entry.nbytes

    def _evict(self, reading: set[tuple[str, str]]) -> None:
        """Until the budget holds: other chunks, least recently read first; then, for a read larger than the
        budget, its own chunks from its last one back, so that a repeated read finds its first chunks cached
        instead of each read evicting what the next one needs (the chunks just read are already assembled)."""
        if self._nbytes <= self.max_bytes:  # the usual case: no pass over every entry per read
            return
        for key in [k for k in self._entries if k not in reading]:
            if self._nbytes <= self.max_bytes:
                return
            self._nbytes -= self._entries.pop(key).nbytes
        while self._nbytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=True)
            self._nbytes -= entry.nbytes

    def __repr__(self) -> str:
        return (f"DeviceCache(device={str(self.device)!r}, chunks={len(self)}, bytes={self._nbytes}/{self.max_bytes}, "
                f"hits={self.hits}, misses={self.misses})")
