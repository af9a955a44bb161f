"""Saving and loading a :class:`~memlong.memory.MemoryBank`: the bank's half of persistence.

Contract:
    * :meth:`BankFiles.save` snapshots the chunks under the read lock (adds and searches keep running) and hands
      a JSON record plus tensors to :func:`memlong.storage.write_bank`, which commits them atomically.
    * :meth:`BankFiles.load` / :meth:`BankFiles.restore` read with :func:`memlong.storage.read_bank`, check the
      embedder and model fingerprint, validate every record with the rules of :mod:`memlong.records` (the same
      ones :meth:`MemoryBank.add_chunks` applies), build the new namespaces aside, and swap them in under the
      write lock: on any error the bank is unchanged.
    * Errors are :class:`~memlong.storage.MemoryFileError` (bad or foreign files),
      :class:`~memlong.records.MemoryMismatchError` (another embedder or model) or
      :class:`~memlong.eviction.MemoryFullError`.

:class:`BankFiles` is a mixin: these methods belong to :class:`MemoryBank` and use its internals.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlong.dtypes import DTYPES
from memlong.embedder import TextEmbedder
from memlong.eviction import MemoryFullError, capacity_victims, warn_evicted
from memlong.records import Chunk, check_bank_config, check_chunk, check_compatible, embedder_info, parse_namespaces
from memlong.search import NamespaceIndex
from memlong.storage import MemoryFileError, read_bank, write_bank

if TYPE_CHECKING:
    from memlong.memory import MemoryBank

__all__ = ["DTYPE_NAMES", "BankFiles"]

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # the one table (memlong.dtypes), inverted


class BankFiles:
    """Persistence methods of :class:`~memlong.memory.MemoryBank` (see the module docstring)."""

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
            ValueError: ``namespaces`` empty or naming namespaces that hold nothing (nothing is written), or
                ``path`` is a file or a non-empty directory that is not a memory bank.
        """
        if namespaces is not None and not list(namespaces):
            raise ValueError(f"save(namespaces=[]) would replace the bank at {path} with an empty one; name the "
                             "namespaces to save, or pass namespaces=None to save them all.")
        with self._lock.read(), self._count_lock:
            names = list(self._spaces) if namespaces is None else list(dict.fromkeys(namespaces))
            missing = [n for n in names if n not in self._spaces]
            if missing:
                raise ValueError(f"Cannot save namespaces {missing}: they hold no chunks.")
            tensors: list[tuple[str, torch.Tensor]] = []
            embeddings: list[tuple[str, torch.Tensor]] = []
            records = []
            for j, name in enumerate(names):
                space = self._spaces[name]
                chunks = []
                for cid in space.ids:  # index row order: the embeddings tensor lines up with this list
                    c = self._chunks[cid]
                    i = len(tensors) // 2  # K-V are numbered across namespaces, as the loader reads them
                    tensors += [(f"k.{i}", c.keys), (f"v.{i}", c.values)]
                    chunks.append({"id": c.id, "doc_id": c.doc_id, "text": c.text, "span": list(c.span),
                                   "order": c.order, "retrievals": c.retrievals, "metadata": c.metadata,
                                   "tokens": None if c.tokens is None else list(c.tokens)})
                records.append({"name": name, "chunks": chunks})
                embeddings.append((f"e.{j}", torch.from_numpy(space.embeddings.copy())))
            record = {
                "config": {"capacity": self.capacity, "evict_oldest": self.evict_oldest,
                           "keep_newest": self.keep_newest, "dtype": DTYPE_NAMES[self.dtype],
                           "max_bytes": self.max_bytes},
                "embedder": embedder_info(self.embedder),
                "fingerprint": fingerprint,
                "next_order": max((c.order for c in self._chunks.values()), default=-1) + 1,
                "namespaces": records,
            }
        # Stored tensors are never written in place, so the files are written outside the lock.
        return write_bank(path, record, tensors + embeddings)

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
        kwargs["dtype"] = {v: k for k, v in DTYPE_NAMES.items()}.get(name) if isinstance(name, str) else None
        kwargs.update(options)
        try:
            if not isinstance(kwargs["dtype"], torch.dtype):
                raise ValueError(f"unknown dtype {name!r}")
            check_bank_config(kwargs["capacity"], kwargs["evict_oldest"], kwargs["keep_newest"], kwargs["max_bytes"])
        except ValueError as exc:
            raise MemoryFileError(f"Cannot load the memory bank at {path}: its config {str(config)[:300]} is invalid "
                                  f"({exc}).") from None
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
        check_compatible(path, record, self.embedder, fingerprint)
        loaded, next_order = parse_namespaces(path, record, tensors, self.embedder.dim)
        if namespaces is not None:
            absent = [n for n in namespaces if n not in loaded]
            if absent:
                raise MemoryFileError(f"Cannot load namespaces {absent} from {path}: it holds {sorted(loaded)}.")
            loaded = {n: loaded[n] for n in namespaces}
        spaces: dict[str, NamespaceIndex] = {}
        sizes: dict[str, int] = {}
        for name, (chunks, vectors) in loaded.items():  # build everything before touching the live bank
            space = NamespaceIndex(self.embedder.dim, self.use_gpu_index)
            for c in chunks:
                c.keys, c.values = self._place(c.keys), self._place(c.values)
                try:
                    check_chunk(text=c.text, doc_id=c.doc_id, span=c.span, keys=c.keys, values=c.values)
                except ValueError as exc:  # finite in the file's dtype, not in this bank's
                    raise MemoryFileError(f"Cannot load chunk {c.id} of {path} into this bank: {exc}") from None
                sizes[c.id] = self._size_of(c)
                space.tokens += c.n_tokens
                space.nbytes += sizes[c.id]
            space.add([c.id for c in chunks], vectors, [c.text for c in chunks])
            spaces[name] = space
        with self._lock.write():
            self._publish(path, loaded, spaces, sizes, next_order)
        return list(spaces)

    def _publish(self, path: Path, loaded: dict[str, tuple[list[Chunk], np.ndarray]], spaces: dict[str, NamespaceIndex],
                 sizes: dict[str, int], next_order: int) -> None:
        """Swap loaded namespaces in (under the write lock), or raise with the bank unchanged."""
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
                del self._sizes[cid]
            self._spaces[name] = space
            for c in loaded[name][0]:
                self._chunks[c.id] = c
                self._sizes[c.id] = sizes[c.id]
            drop = capacity_victims(loaded[name][0], self.capacity, self.evict_oldest, self.keep_newest)
            warn_evicted(name, len(drop), f"memory_capacity={self.capacity} tokens",  # a smaller capacity than
                         "raise memory_capacity (MemLongConfig / MemoryBank(capacity=...))", stacklevel=4)
            self._remove(name, drop)  # the saving bank's: the usual rule applies
        nxt = next(self._order)
        self._order = itertools.count(max(nxt, next_order))
