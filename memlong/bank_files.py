"""Saving and loading a :class:`~memlong.memory.MemoryBank`: the bank's half of persistence.

Contract:
    * :meth:`BankFiles.save` snapshots the chunks under the read lock (adds and searches keep running) and hands
      a JSON record plus tensors to :func:`memlong.storage.write_bank`, which commits them atomically.
    * :meth:`BankFiles.load` / :meth:`BankFiles.restore` read with :func:`memlong.storage.read_bank`, check the
      embedder and model fingerprint, validate every record with the rules of :mod:`memlong.records` (the same
      ones :meth:`MemoryBank.add_chunks` applies), build the new namespaces aside, and swap them in under the
      write lock: on any error the bank is unchanged.
    * A disk bank (``MemoryBank(path=...)``): :meth:`BankFiles.commit` writes its buffered K-V as a segment, then
      the record, the embeddings and a version-2 manifest naming every live segment (under the write lock: adds
      wait for the commit); :meth:`BankFiles.compact` rewrites mostly-dead segments and commits. :meth:`load` of
      such a directory reopens it in place, memory-mapping the segments (nothing is read but the record and
      the embeddings). A kill at any point leaves the last committed state (the manifest is the commit point).
    * Errors are :class:`~memlong.storage.MemoryFileError` (bad or foreign files),
      :class:`~memlong.records.MemoryMismatchError` (another embedder or model) or
      :class:`~memlong.eviction.MemoryFullError`.

:class:`BankFiles` is a mixin: these methods belong to :class:`MemoryBank` and use its internals.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlong.dtypes import to_dtype
from memlong.embedder import TextEmbedder
from memlong.eviction import MemoryFullError, capacity_victims, warn_evicted
from memlong.journal import DTYPE_NAMES, chunk_record, header
from memlong.journal import committed as now_committed
from memlong.journal import loaded as reopened
from memlong.journal import prepare as prepare_commit
from memlong.kv_payload import DenseKV, Int8KV, KVPayload, check_quantization
from memlong.kv_store import DiskKVStore, segment_tensors
from memlong.records import (
    Chunk,
    MemoryMismatchError,
    as_list,
    check_bank_config,
    check_chunk,
    check_compatible,
    parse_namespaces,
)
from memlong.search import NamespaceIndex
from memlong.storage import MemoryFileError, committed, read_bank, record_name, write_bank

if TYPE_CHECKING:
    from memlong.memory import MemoryBank

__all__ = ["DTYPE_NAMES", "BankFiles"]



def _refused(exc: OSError, action: str, state: str) -> OSError:
    """The error of a save or commit the disk refused: what the directory holds now, and that nothing was lost."""
    return OSError(exc.errno, f"Cannot {action}: {exc.strerror or exc}. {state[0].upper()}{state[1:]}, and nothing "
                              f"in this bank was lost; free space (or fix permissions) and {action.split()[0]} again.")


def _chosen(path: Path, loaded: dict[str, Any], namespaces: Sequence[str] | None) -> dict[str, Any]:
    """``loaded`` restricted to ``namespaces`` (``None``: all); MemoryFileError naming those it does not hold."""
    if namespaces is None:
        return loaded
    names = as_list(namespaces, "namespaces")
    absent = [n for n in names if n not in loaded]
    if absent:
        raise MemoryFileError(f"Cannot load namespaces {absent} from {path}: it holds {sorted(loaded)}.")
    return {n: loaded[n] for n in names}


def _check_loaded_config(path: Any, config: dict[str, Any], kwargs: dict[str, Any], name: Any,
                         options: dict[str, Any]) -> None:
    """MemoryFileError unless a saved config (with load()'s ``options`` in ``kwargs``) makes a valid bank; ValueError
    where the saved config is valid and the options make it invalid (the caller's, not the file's)."""
    problem = f"Cannot load the memory bank at {path}: its config {str(config)[:300]} is invalid"
    if not isinstance(kwargs["dtype"], torch.dtype):
        raise MemoryFileError(f"{problem} (unknown dtype {name!r}); load(dtype=...) can override it.")
    try:
        check_quantization(kwargs["quantization"])
    except ValueError as exc:
        raise MemoryFileError(f"{problem} ({exc}).") from None
    try:
        check_bank_config(*(kwargs[k] for k in _OVERRIDES))
    except ValueError as exc:
        try:
            check_bank_config(*(config.get(k) for k in _OVERRIDES))
        except ValueError:
            raise MemoryFileError(f"{problem} ({exc}). load() can override {', '.join(_OVERRIDES)} (e.g. "
                                  "keep_newest=0.1).") from None
        raise ValueError(f"load()'s options with the bank's saved config at {path}: {exc}") from None


_OVERRIDES = {"capacity": 1, "evict_oldest": 0.0, "keep_newest": 0.0, "max_bytes": None}  # (values that pass)


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
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path (a str or Path), got {type(path).__name__} {path!r}.")
        if namespaces is not None and not (namespaces := as_list(namespaces, "namespaces")):
            raise ValueError(f"save(namespaces=[]) would replace the bank at {path} with an empty one; name the "
                             "namespaces to save, or pass namespaces=None to save them all.")
        if self.path is not None and Path(path).resolve() == self.path.resolve():
            if namespaces is not None:
                raise ValueError(f"{path} is this disk bank's own directory: commit saves every namespace; save "
                                 "some namespaces to another directory.")
            return self.commit(fingerprint=fingerprint)
        with self._lock.read(), self._count_lock:
            record, tensors = self._snapshot(namespaces, fingerprint, inline=True)
        # Stored tensors are never written in place, so the files are written outside the lock.
        manifest = Path(path) / "manifest.json"
        before = manifest.read_bytes() if manifest.is_file() else None
        try:
            write_bank(path, record, tensors)
            return Path(path)
        except OSError as exc:
            after = manifest.read_bytes() if manifest.is_file() else None
            state = ("the new save is in place, but the disk could not confirm it" if after != before else
                     "the bank saved there before is still there and loadable" if before is not None else
                     "nothing loadable was written there")
            raise _refused(exc, f"save the memory bank to {path}", state) from None

    def commit(self, *, fingerprint: dict[str, Any] | None = None) -> Path:
        """Make a disk bank durable in its directory: buffered K-V become a segment, then the record and a new
        manifest (the commit point) are written; segments no chunk uses any more are deleted after it.

        Example:
            >>> bank = MemoryBank(embedder=Embedder(), path="corpus.bank", quantization="int8")
            >>> bank.add_chunks(texts, keys=keys, values=values); bank.commit()

        Raises:
            ValueError: not a disk bank, or another writer (process, or bank on the same path) committed to the
                directory since this bank opened it (nothing written; reopen it and redo the changes).
            OSError: the disk refused a write (full, read-only): the directory holds the last commit (or the new
                one, failing after the commit point; the message says which), this bank is unchanged.
        """
        if self.path is None:
            raise ValueError("commit() makes a disk bank durable; this bank keeps K-V in memory. Use save(path), "
                             "or create it with MemoryBank(path=...).")
        with self._lock.write():
            if fingerprint is not None:  # (in the write: a commit refused there changes nothing)
                self._fingerprint = fingerprint
            token, change = secrets.token_hex(8), None
            try:
                self._store.checkpoint()  # the buffer as a segment (small segments merged once there are many)
                # what changed since the last commit (memlong.journal), or the whole record
                change = prepare_commit(self, getattr(self, "_fingerprint", None))
                name = write_bank(self.path, change.record, change.tensors, segments=self._store.entries(),
                                  expect=self._store.committed, token=token, delta=change.delta)
            except BaseException as exc:  # a disk error, or Ctrl-C, after the commit point: the commit is in
                landed = change is not None and committed(self.path) == record_name(token, change.delta is not None)
                if landed:  # (else every later commit was refused as "committed by another writer")
                    now_committed(self._store, change, record_name(token, change.delta is not None))
                if not isinstance(exc, OSError):
                    raise
                raise _refused(exc, f"commit the disk bank at {self.path}", "the new commit is in place, but the disk "
                               "could not confirm it" if landed else "the directory still holds the last commit") from None
            now_committed(self._store, change, name)
            return self.path

    def compact(self, threshold: float = 0.5) -> int:
        """Reclaim disk space of deleted and evicted chunks: segments whose live share is below ``threshold`` (and
        the small segments, when there are several) are rewritten (their live chunks only) and the bank commits;
        returns the bytes freed. Safe to kill: until the commit the old segments are what the manifest names.

        Example:
            >>> bank.delete(doc_id="old"); bank.compact()
        """
        if self.path is None:
            raise ValueError("compact() reclaims a disk bank's segment files; this bank keeps K-V in memory.")
        with self._lock.write():
            freed = self._store.compact(threshold)
        self.commit()
        return freed

    def _snapshot(self, namespaces: Sequence[str] | None, fingerprint: dict[str, Any] | None,
                  inline: bool) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
        """The record and tensors of a save (under a lock): K-V inline, or (a disk bank's commit) by segment."""
        # an adapter's upsert in flight (its staging space) is not saved: it lands whole in its namespace, or not
        names = list(self._visible()) if namespaces is None else list(dict.fromkeys(namespaces))
        missing = [n for n in names if n not in self._spaces]
        if missing:
            raise ValueError(f"Cannot save namespaces {missing}: they hold no chunks.")
        tensors: list[tuple[str, torch.Tensor]] = []
        embeddings: list[tuple[str, torch.Tensor]] = []
        records: list[dict[str, Any]] = []
        n_chunk = 0
        for j, name in enumerate(names):
            space = self._spaces[name]
            chunks = []
            for cid in space.ids:  # index row order: the embeddings tensor lines up with this list
                c, i, n_chunk = self._chunks[cid], n_chunk, n_chunk + 1
                if inline:  # K-V are numbered across namespaces, as the loader reads them
                    tensors += [(f"{suffix}.{i}", t) for suffix, t in c.kv.named().items()]
                chunks.append(chunk_record(c))
                if not inline:
                    chunks[-1]["segment"] = self._store.where[c.id]
            records.append({"name": name, "chunks": chunks})
            embeddings.append((f"e.{j}", torch.from_numpy(space.embeddings.copy())))
        return {**header(self, fingerprint), "namespaces": records}, tensors + embeddings

    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder: TextEmbedder, namespaces: Sequence[str] | None = None,
             fingerprint: dict[str, Any] | None = None, verify: bool = False, evict: bool = True,
             **options: Any) -> MemoryBank:
        """A new bank holding what :meth:`save` wrote to ``path``.

        ``embedder`` must be the one the bank was built with (same name and dimension); the faiss indexes are
        rebuilt from the stored embeddings. ``fingerprint``: the loading model's fingerprint; any difference
        from the stored one raises :class:`MemoryMismatchError`. ``options`` override the saved constructor
        arguments (``capacity``, ``max_bytes``, ``dtype``, ``device``, ...). A disk bank (written by :meth:`commit`)
        reopens in place: its segments are memory-mapped, not read, and later commits go to the same directory;
        ``verify=True`` also checks every segment's sha256 (reads them all once). A smaller ``capacity`` than a
        namespace holds evicts on load (a disk bank's next commit then deletes the evicted chunks); ``evict=False``
        refuses such a load instead (:class:`MemoryMismatchError`), as a ``memory_path`` reopen does.

        Example:
            >>> bank = MemoryBank.load("memory/alice", embedder=Embedder())

        Raises:
            MemoryFileError: missing, truncated, corrupted or unknown files (nothing is loaded).
            MemoryMismatchError: a bank made by another embedder or model (both are named).
        """
        return _retrying(path, lambda: _load(cls, path, embedder, namespaces, fingerprint, verify, options, evict))

    def restore(self, path: str | os.PathLike, *, namespaces: Sequence[str] | None = None,
                fingerprint: dict[str, Any] | None = None, single: bool = False) -> list[str]:
        """Load saved namespaces into this bank in place, replacing namespaces of the same name (others stay).

        This bank's own config (capacity, max_bytes, dtype, device) applies to what is loaded. Returns the names
        loaded. Raises like :meth:`load`, plus :class:`MemoryFullError` when the result would exceed ``max_bytes``,
        and with ``single`` :class:`MemoryFileError` unless the file holds one namespace (as a store's ``persist``
        writes); on any error this bank is unchanged.
        """
        if self.path is not None and Path(path).resolve() == self.path.resolve():
            raise ValueError(f"{path} is this disk bank's own folder: the bank already holds it (and what was added "
                             "since its last commit()). To open the committed state apart, use MemoryBank.load(path).")
        def attempt() -> list[str]:
            record, tensors, segments, _ = read_bank(path)
            held = record.get("namespaces")
            if single and not (isinstance(held, list) and len(held) == 1):  # it would replace other stores' memory
                raise MemoryFileError(f"{path} holds {len(held) if isinstance(held, list) else 'no'} namespaces, not one "
                                      "(persist() writes one); nothing was loaded. Load a bank you trust with load_memory.")
            quantization = (record.get("config") or {}).get("quantization", "none")
            if quantization != self.quantization:
                raise MemoryMismatchError(f"The memory bank at {path} stores K-V with quantization={quantization!r}; "
                                          f"this bank uses {self.quantization!r}. Restore into a bank with the same "
                                          "setting, or re-ingest.")
            return self._restore(Path(path), record, tensors, namespaces, fingerprint, segments, renumber=True)

        return _retrying(path, attempt)

    def _restore(self, path: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor],
                 namespaces: Sequence[str] | None, fingerprint: dict[str, Any] | None,
                 segments: list[dict[str, Any]] | None = None, renumber: bool = False, evict: bool = True) -> list[str]:
        check_compatible(path, record, self.embedder, fingerprint)
        in_place = segments is not None and self.path is not None and self.path == path  # a disk bank reopening
        where: dict[int, str] = {}
        if segments is not None:
            source = self._store if in_place else DiskKVStore(path, quantization=self.quantization, dtype=self.dtype)
            tensors = {**tensors, **segment_tensors(path, record, source.attach(segments), where)}
        loaded, next_order = parse_namespaces(path, record, tensors, self.embedder.dim, self.dtype,
                                              mapped=segments is not None)
        if in_place:
            every = [(c, where[n]) for n, c in enumerate(c for chunks, _ in loaded.values() for c in chunks)]
            for c, segment in every:
                self._store.adopt(c, segment)
            reopened(self._store, every)
        loaded = _chosen(path, loaded, namespaces)
        spaces: dict[str, NamespaceIndex] = {}
        sizes: dict[str, int] = {}
        for name, (chunks, vectors) in loaded.items():  # build everything before touching the live bank
            space = NamespaceIndex(self.embedder.dim, self.use_gpu_index, self.ann_min_chunks)
            for c in chunks:
                if not in_place:
                    c.kv = self._adopt_payload(c.kv, path, c.id, copy=segments is not None)
                sizes[c.id] = self._size_of(c)
                space.tokens += c.n_tokens
                space.nbytes += sizes[c.id]
            space.add([c.id for c in chunks], vectors, [c.text for c in chunks], [c.doc_id for c in chunks])
            spaces[name] = space
        with self._lock.write():
            self._publish(path, loaded, spaces, sizes, next_order, renumber, evict)
        return list(spaces)

    def _adopt_payload(self, kv: KVPayload, path: Path, cid: str, copy: bool) -> KVPayload:
        """A loaded payload on this bank's device (dense: in its dtype, checked again), owned by this bank."""
        if isinstance(kv, Int8KV):
            return Int8KV(*(self._place_raw(t, copy) for t in (kv.kq, kv.ks, kv.km, kv.vq, kv.vs, kv.vm)), dtype=self.dtype)
        keys, values = self._place(kv.k), self._place(kv.v)
        keys, values = (keys.clone(), values.clone()) if copy and keys.data_ptr() == kv.k.data_ptr() else (keys, values)
        if copy or keys.dtype != kv.k.dtype:  # mapped values are unread; the others were checked in the file's dtype
            try:
                check_chunk(text="x", doc_id="", span=(0, 0), keys=keys, values=values)
            except ValueError as exc:  # finite in the file's dtype, not in this bank's
                raise MemoryFileError(f"Cannot load chunk {cid} of {path} into this bank: {exc}") from None
        return DenseKV(keys, values)

    def _place_raw(self, t: torch.Tensor, copy: bool) -> torch.Tensor:
        placed = t.to(self.device).contiguous()
        return placed.clone() if copy and placed.data_ptr() == t.data_ptr() else placed

    def _publish(self, path: Path, loaded: dict[str, tuple[list[Chunk], np.ndarray]], spaces: dict[str, NamespaceIndex],
                 sizes: dict[str, int], next_order: int, renumber: bool = False, evict: bool = True) -> None:
        """Swap loaded namespaces in (under the write lock), or raise with the bank unchanged. ``renumber``
        (``restore``): when a saved insertion order is that of a chunk this bank keeps (two chunks of one order made
        the bank's next save unloadable), the loaded chunks get new orders after this bank's own, in their saved
        order."""
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
                                      f"max_bytes={self.max_bytes}. Raise max_bytes, load fewer namespaces "
                                      "(namespaces=[...]), or reset namespaces of this bank first.")
        victims = {name: capacity_victims(loaded[name][0], self.capacity, self.evict_oldest, self.keep_newest)
                   for name in spaces}  # a smaller capacity than the saving bank's: the usual rule applies
        for name, drop in victims.items():  # warned before anything changes (a warning raised as an error)
            if drop and not evict:  # (a disk bank's next commit would delete them)
                raise MemoryMismatchError(
                    f"Opening the memory bank at {path} with capacity={self.capacity} tokens (memory_capacity in "
                    f"MemLongConfig) would evict {len(drop)} chunks of namespace {name!r} (a disk bank's next commit "
                    "deletes them). Nothing was changed. Open it with a capacity at least as large as the one it was "
                    "filled with; to shrink it, MemoryBank.load(path, capacity=..., evict=True).")
            warn_evicted(name, len(drop), f"memory_capacity={self.capacity} tokens on load (it was saved larger)",
                         "give the bank a capacity at least the saved one (load(evict=False) refuses instead)")
        every = [c for chunks, _ in loaded.values() for c in chunks]  # (the same relative order: the victims stand)
        if renumber and {c.order for c in self._chunks.values() if c.namespace not in spaces} & {c.order for c in every}:
            for c in sorted(every, key=lambda c: c.order):
                c.order = next(self._order)
        for name, space in spaces.items():
            old = self._spaces.pop(name, None)
            self._store.drop(self._chunks[cid] for cid in (old.ids if old is not None else ()))
            if not (self.path is not None and self.path == path):  # a disk bank reopening: adopted in place
                self._store.put(loaded[name][0])
            for cid in old.ids if old is not None else ():
                del self._chunks[cid]
                del self._sizes[cid]
            self._spaces[name] = space
            for c in loaded[name][0]:
                self._chunks[c.id] = c
                self._sizes[c.id] = sizes[c.id]
            self._remove(name, victims[name])
        nxt = next(self._order)
        self._order = itertools.count(max(nxt, next_order))


def _load(cls: type[MemoryBank], path: str | os.PathLike, embedder: TextEmbedder, namespaces: Sequence[str] | None,
          fingerprint: dict[str, Any] | None, verify: bool, options: dict[str, Any], evict: bool = True) -> MemoryBank:
    """The body of :meth:`BankFiles.load` (one attempt)."""
    check_bank_config(**{**_OVERRIDES, **{k: v for k, v in options.items() if k in _OVERRIDES}})  # the caller's own
    if isinstance(options.get("dtype"), str):  # a dtype's name, as the constructor takes it
        options = {**options, "dtype": to_dtype(options["dtype"])}
    record, tensors, segments, commit = read_bank(path, verify=verify)
    config = record.get("config")
    if not isinstance(config, dict):
        raise MemoryFileError(f"Cannot load the memory bank at {path}: its config is missing.")
    kwargs: dict[str, Any] = {k: config.get(k) for k in _OVERRIDES}
    name = config.get("dtype")
    kwargs["dtype"] = {v: k for k, v in DTYPE_NAMES.items()}.get(name) if isinstance(name, str) else None
    stored = {"quantization": config.get("quantization", "none"), "dtype": kwargs["dtype"]}
    for key in ("quantization",) + (("dtype",) if segments is not None else ()):
        if key in options and options[key] != stored[key]:
            config_value = DTYPE_NAMES.get(stored[key], stored[key]) if key == "dtype" else stored[key]
            raise MemoryMismatchError(f"The memory bank at {path} stores K-V with {key}={stored[key]!r}, but it "
                                      f"is being opened with {key}={options[key]!r}. Open it with "
                                      f"{key}={stored[key]!r} (memory_{key}={config_value!r} in MemLongConfig), "
                                      "or re-ingest.")
    kwargs.update(options, quantization=stored["quantization"])
    kwargs.pop("path", None)
    _check_loaded_config(path, config, kwargs, name, options)
    bank = cls(embedder=embedder, **kwargs)
    if segments is not None:
        if namespaces is not None:
            raise ValueError(f"{path} is a disk bank: it reopens whole. Copy some namespaces into another bank "
                             "with restore(path, namespaces=...).")
        store = DiskKVStore(path, quantization=bank.quantization, dtype=bank.dtype,
                            segment_bytes=kwargs.get("segment_bytes", _segment_bytes(config)))
        store.committed = commit  # what a commit of this bank expects to replace (one writer per directory)
        bank.path, bank._store, bank._fingerprint = Path(path), store, fingerprint
        journal = record.get("journal") or {"deltas": 0, "changes": 0}  # what read_bank replayed
        store.journal = (journal["deltas"], journal["changes"])
    try:
        bank._restore(Path(path), record, tensors, namespaces, fingerprint, segments, evict=evict)
    except MemoryFullError as exc:
        if "max_bytes" in options:
            raise
        raise MemoryFileError(f"Cannot load the memory bank at {path}: it holds more than its saved max_bytes ({exc}). "
                              "Saves before 6 Dec 2026 did not count metadata, and load()'s options (dtype, ...) can "
                              "make chunks larger. Pass max_bytes= to override.") from None
    return bank


def _retrying(path: str | os.PathLike, attempt: Callable[[], Any]) -> Any:
    """``attempt()`` (a load that reads ``path`` and builds from it), again when it fails while another process
    commits: a disk bank's segments are opened after its record was read, and a commit in between may have removed
    one the record names (then the commit is read anew; up to 3 tries). Other failures raise at once."""
    for tries in range(3):
        before = committed(path)
        try:
            return attempt()
        except MemoryFileError:
            if tries == 2 or committed(path) == before:
                raise
    raise AssertionError("unreachable")


def _segment_bytes(config: dict[str, Any]) -> int:
    """The segment size a disk bank was made with (64 MiB if not recorded, or not a size): reopened with another, its
    segments could all count as mid-sized and be merged at the next commit (a rewrite of the whole bank)."""
    saved = config.get("segment_bytes")
    return saved if type(saved) is int and saved > 0 else 64 << 20
