"""Where a bank's K-V payloads live: in memory (:class:`KVStore`) or on disk (:class:`DiskKVStore`).

Contract (the seam between the bank and its K-V, in the spirit of vLLM's KV-connector base):
    * The bank keeps its index, texts, embeddings and counters itself; a store only holds payloads
      (:mod:`memlong.kv_payload`). Every stored chunk's ``chunk.kv`` is readable at any time.
    * :meth:`KVStore.encode` turns checked K-V (in the bank's dtype and device) into a payload (quantized when
      the bank's ``quantization`` is ``"int8"``). :meth:`put` hands the store the chunks the bank just published,
      :meth:`drop` the chunks it removed; neither can fail (no I/O). :meth:`flush` may do I/O and may fail with
      ``OSError``; the bank stays consistent either way (unflushed payloads simply stay in RAM).
    * :class:`DiskKVStore` (directory ``path``): ``put`` buffers payloads in RAM; when ``segment_bytes`` are
      buffered (or at a commit) they are written as one new, immutable safetensors *segment*
      (``seg-<16 hex>.safetensors``, tensors ``"<suffix>.<chunk id>"``, fsynced) and every buffered chunk's
      payload is swapped for views of a read-only memory map of that file: a fetch reads only the pages of the
      chunks it asks for, and :meth:`release` (the bank calls it after a fetch has copied them) lets those pages
      go again, so resident memory stays bounded however large the bank. Segments are never modified. :meth:`compact`
      rewrites the live chunks of segments that are mostly dead (deleted or evicted chunks) into a new segment;
      the old files disappear only after the next commit no longer names them (:mod:`memlong.storage`), so a
      kill at any point leaves the last committed state readable.
    * Nothing a store writes is durable until the bank commits (``MemoryBank.commit``): the bank's manifest,
      written last, is the one commit point, and it names the segments (size and sha256) the bank needs.

Example:
    >>> os.makedirs("bank.kv", exist_ok=True)   # the store writes into an existing directory (the bank's)
    >>> store = DiskKVStore("bank.kv", quantization="int8", dtype=torch.float16)
    >>> chunk.kv = store.encode(keys, values); store.put([chunk]); store.flush(force=True)  # (else: once 64 MiB wait)
    >>> store.entries()  # what the manifest will name: [{'name': 'seg-....safetensors', 'bytes': ..., 'sha256': ...}]
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import secrets
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlong.bank_writes import is_staging
from memlong.kv_payload import KVPayload, Quantization, encode, payload_from
from memlong.storage import SEGMENT_NAME, MemoryFileError, committed, write_segment

if TYPE_CHECKING:
    from memlong.records import Chunk

__all__ = ["DiskKVStore", "KVStore", "Segment", "new_store", "open_disk_store", "segment_of", "segment_tensors"]

def _libc_trim() -> Callable[[int], int] | None:
    try:  # glibc keeps freed tensor memory in its heap; malloc_trim hands it back to the OS
        return ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()
_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "BF16": np.uint16}
_ITEMSIZE = {kind: np.dtype(t).itemsize for kind, t in _NUMPY.items()}


class KVStore:
    """Payloads in RAM (or on the bank's device): today's behaviour, exact."""

    def __init__(self, *, quantization: Quantization, dtype: torch.dtype) -> None:
        self.quantization = quantization
        self.dtype = dtype

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> KVPayload:
        return encode(keys, values, self.quantization, self.dtype)

    def put(self, chunks: Iterable[Chunk]) -> None:
        """The bank published ``chunks`` (their ``kv`` set by :meth:`encode` or adopted from a file)."""

    def drop(self, chunks: Iterable[Chunk]) -> None:
        """The bank removed ``chunks``."""

    def flush(self, force: bool = False) -> None:
        """Write buffered payloads (disk stores); ``force``: even below the segment size."""

    def release(self, chunks: Iterable[Chunk]) -> None:
        """A fetch has copied ``chunks``' K-V: a disk store lets their pages go (resident memory stays bounded)."""

    def read(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """``chunk``'s keys and values for a fetch (a disk store checks what it reads from its files)."""
        return chunk.keys, chunk.values


def _check_header(header: Any, size: int) -> None:
    """ValueError unless a segment header lays its tensors out as safetensors does: each a dtype, a shape and
    offsets of exactly its bytes, in order and never overlapping (a crafted header could point many chunks at one
    tensor's bytes, and loading would copy them once per chunk: 400 MB from a 1.3 MB file)."""
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets, shape, kind = (info.get("data_offsets"), info.get("shape"), info.get("dtype")) \
            if isinstance(info, dict) else (None, None, None)
        if not (isinstance(offsets, list) and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int
                and 0 <= offsets[0] <= offsets[1] <= size and kind in _ITEMSIZE and isinstance(shape, list)
                and all(type(x) is int and x >= 0 for x in shape)
                and math.prod(shape) * _ITEMSIZE[kind] == offsets[1] - offsets[0]):
            raise ValueError(f"tensor {name} has a malformed entry")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, b, name), (a, _, _) in zip(spans, spans[1:]):
        if a < b:
            raise ValueError(f"tensor {name} shares bytes with another tensor")


class Segment:
    """One immutable segment file: its manifest entry, its memory map and which chunks still use it."""

    def __init__(self, path: Path, entry: dict[str, Any]) -> None:
        self.path, self.entry = path, entry
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > entry["bytes"] - 8:
                raise ValueError("header longer than the file")
            try:
                self.header = json.loads(fh.read(n).decode("utf-8"))
            except RecursionError:
                raise ValueError("header nested too deeply") from None
        self.start = 8 + n
        _check_header(self.header, entry["bytes"] - self.start)
        self.map: np.ndarray | None = None
        self.mmap: mmap.mmap | None = None
        if entry["bytes"] > self.start:
            with open(path, "rb") as fh:  # copy-on-write: never written, but torch wants a writable buffer
                self.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self.map = np.frombuffer(self.mmap, dtype=np.uint8)
        self.live: dict[str, Chunk] = {}  # chunk id -> the bank's chunk whose payload lives here

    def tensor(self, name: str) -> torch.Tensor | None:
        info = self.header.get(name)
        if not isinstance(info, dict) or self.map is None:
            return None
        a, b = info["data_offsets"]  # dtype, shape and offsets were checked against the file at open (_check_header)
        t = torch.from_numpy(self.map[self.start + a:self.start + b].view(_NUMPY[info["dtype"]]).reshape(info["shape"]))
        return t.view(torch.bfloat16) if info["dtype"] == "BF16" else t

    def release(self, name: str) -> None:
        """Let the kernel drop the pages of tensor ``name`` from this process (they are read again from the file
        when next needed), so that resident memory holds only what is being used."""
        info = self.header.get(name)
        if self.mmap is None or not isinstance(info, dict) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        a, b = (self.start + x for x in info["data_offsets"])
        lo, hi = a - a % mmap.PAGESIZE, min(len(self.mmap), -(-b // mmap.PAGESIZE) * mmap.PAGESIZE)
        if hi > lo:
            self.mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    @property
    def live_bytes(self) -> int:
        return sum(c.kv.nbytes for c in self.live.values())


# a commit merges the small segments (under a quarter of segment_bytes) once there would be this many
MERGE_SMALL = 16


class DiskKVStore(KVStore):
    """Payloads in append-only segment files under ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, quantization: Quantization, dtype: torch.dtype,
                 segment_bytes: int = 64 << 20) -> None:
        super().__init__(quantization=quantization, dtype=dtype)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"a disk bank stores float16, bfloat16 or float32 K-V, not {dtype}.")
        if type(segment_bytes) is not int or segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be a positive integer, got {segment_bytes!r}.")
        self.path = Path(path)
        self.segment_bytes = segment_bytes
        self.segments: dict[str, Segment] = {}
        self.where: dict[str, str] = {}  # chunk id -> segment name
        self.pending: dict[str, Chunk] = {}  # chunks whose payloads are still in RAM
        self.pending_bytes = 0
        self.dead: set[str] = set()  # segments no live chunk uses: removed from the next commit
        self.committed: str | None = None  # the directory's commit this store last opened or wrote (storage.committed)
        self.view: dict | None = None  # what that commit holds, chunk by chunk (memlong.journal: the next delta's base)
        self.journal = (0, 0)  # deltas written since the whole record, and the chunk changes they hold
        self.finite: set[str] = set()  # mapped chunks whose K-V a fetch found finite (read)

    # ------------------------------------------------------------------ the bank's calls
    def put(self, chunks: Iterable[Chunk]) -> None:
        for c in chunks:
            if is_staging(c.namespace):  # an upsert's staging space: kept in RAM, written by the add that moves it
                continue
            self.pending[c.id] = c
            self.pending_bytes += c.kv.nbytes

    def drop(self, chunks: Iterable[Chunk]) -> None:
        for c in chunks:
            self.finite.discard(c.id)
            if self.pending.pop(c.id, None) is not None:
                self.pending_bytes -= c.kv.nbytes
            name = self.where.pop(c.id, None)
            if name is not None:
                seg = self.segments[name]
                seg.live.pop(c.id, None)
                if not seg.live:
                    self.dead.add(name)
                    del self.segments[name]

    def flush(self, force: bool = False) -> None:
        if not self.pending or (not force and self.pending_bytes < self.segment_bytes):
            return
        chunks = list(self.pending.values())
        tensors = [(f"{suffix}.{c.id}", t) for c in chunks for suffix, t in c.kv.named().items()]
        name = f"seg-{secrets.token_hex(8)}.safetensors"
        try:
            entry = write_segment(self.path / name, tensors)  # fsynced; OSError (a full disk) leaves it all in RAM
        except OSError as exc:
            if force:  # a commit or compaction: it says what the directory holds
                raise
            raise OSError(exc.errno, f"Cannot add to the disk bank at {self.path}: writing its full K-V buffer as a "
                                     f"segment failed ({exc.strerror or exc}). Nothing was added and nothing was lost "
                                     "(the buffered chunks stay in RAM); free space (or fix permissions) and add "
                                     "again.") from None
        seg = Segment(self.path / name, entry)
        for c in chunks:
            c.kv = self._mapped(seg, c.id)
            seg.live[c.id] = c
            self.where[c.id] = name
        self.segments[name] = seg
        self.pending.clear()
        self.pending_bytes = 0
        if _TRIM is not None:  # the buffered payloads just freed: without this glibc keeps them (measured: RSS grew
            _TRIM(0)           # ~1 MB per chunk of the default model; malloc_trim gave it back, docs/disk.md)

    def compact(self, threshold: float = 0.5) -> int:
        """Rewrite the live chunks of segments whose live share is below ``threshold``, and of the small segments
        (under a quarter of ``segment_bytes``) when there are several, into a new segment; returns the bytes the
        next commit frees. The old files stay until a commit no longer names them."""
        victims = [s for s in self.segments.values() if s.live_bytes < threshold * (s.entry["bytes"] - s.start)]
        small = self._small()
        victims += [s for s in small if s not in victims] if len(small) > 1 else []
        return self._rewrite(victims)

    def checkpoint(self) -> None:
        """Before a commit: write the buffer as a segment, merged with the small segments (under a quarter of
        ``segment_bytes``) once there are ``MERGE_SMALL`` of them; and merge the mid-sized ones (a quarter to a whole
        ``segment_bytes``: a document per commit) once there are ``MERGE_SMALL`` of those. Each mapped segment holds
        a file descriptor: a commit per message would otherwise exhaust them after about a thousand commits. Small
        segments may be merged again while their merge stays small; a merge of mid-sized ones is at least four
        times ``segment_bytes`` and is never merged again, so each of their bytes is rewritten once.

        ValueError when the bank's directory is gone since it was opened (a segment written now would fail with a
        FileNotFoundError that said the directory still held the last commit)."""
        if not self.path.is_dir() or (self.committed is not None and committed(self.path) is None):
            raise ValueError(f"The disk bank at {self.path} is gone: its directory or manifest was deleted or moved "
                             "since this bank opened it. Nothing was written; to keep what this bank holds, save it "
                             "to another directory with save(path) while this process still has it open.")
        small = self._small()
        if len(small) + bool(self.pending) >= MERGE_SMALL:
            self._rewrite(small)
        mid = [s for s in self.segments.values() if self.segment_bytes // 4 <= s.entry["bytes"] < self.segment_bytes]
        if len(mid) >= MERGE_SMALL:
            self._rewrite(mid)
        self.flush(force=True)

    def _small(self) -> list[Segment]:
        return [s for s in self.segments.values() if s.entry["bytes"] < self.segment_bytes // 4]

    def _rewrite(self, victims: list[Segment]) -> int:
        """Write the live chunks of ``victims`` (and the buffer) into one new segment; the bytes it frees."""
        freed = sum(s.entry["bytes"] for s in victims) - sum(s.live_bytes for s in victims)
        if not victims:
            return 0
        moving = [c for s in victims for c in s.live.values()]
        self.put(moving)  # payloads still read from the old maps, written again into the new segment
        try:
            self.flush(force=True)  # moves them (``where``) to the new segment once it is written
        except BaseException:  # e.g. a full disk: they stay in their old segments, as if compact was not called
            for c in moving:
                if self.pending.pop(c.id, None) is not None:
                    self.pending_bytes -= c.kv.nbytes
            raise
        for s in victims:
            self.dead.add(s.path.name)
            del self.segments[s.path.name]
        return freed

    def read(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = chunk.keys, chunk.values
        if chunk.id not in self.where or chunk.id in self.finite:  # in RAM (checked when added), or checked before
            return keys, values
        if torch.isfinite(keys).all() and torch.isfinite(values).all():
            self.finite.add(chunk.id)  # a chunk's pages are checked on its first fetch only, not on every answer
        else:
            raise MemoryFileError(f"Chunk {chunk.id} of namespace {chunk.namespace!r} reads non-finite K-V from segment "
                                  f"{self.where[chunk.id]} in {self.path}: the file is corrupted (every chunk added "
                                  "is checked finite). MemoryBank.load(path, verify=True) checks every segment's "
                                  "sha256; restore the directory from a copy, or re-ingest.")
        return keys, values

    def release(self, chunks: Iterable[Chunk]) -> None:
        """Drop the resident pages of ``chunks``' segment data (after a fetch has copied them)."""
        for c in chunks:
            seg = self.segments.get(self.where.get(c.id, ""))
            if seg is not None:
                for suffix in c.kv.named():
                    seg.release(f"{suffix}.{c.id}")

    def entries(self) -> list[dict[str, Any]]:
        """Manifest entries of every segment a live chunk uses (call :meth:`flush` with ``force`` first)."""
        return [s.entry for s in self.segments.values()]

    # ------------------------------------------------------------------ reopening
    def attach(self, entries: list[dict[str, Any]]) -> dict[str, Segment]:
        """Open the segments a committed manifest names (sizes already checked); MemoryFileError if unreadable."""
        opened = {}
        for entry in entries:
            try:
                opened[entry["name"]] = Segment(self.path / entry["name"], entry)
            except OSError as exc:  # e.g. too many open files: each mapped segment holds a descriptor
                cause = ("too many open files: raise the limit (ulimit -n), then load it and compact() it"
                         if exc.errno == errno.EMFILE else "the file is corrupted or unreadable")
                raise MemoryFileError(f"Cannot load the memory bank at {self.path}: segment {entry['name']} cannot "
                                      f"be opened ({exc}); {cause}.") from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise MemoryFileError(f"Cannot load the memory bank at {self.path}: segment {entry['name']} is "
                                      f"unreadable ({exc}); the file is corrupted.") from None
        self.segments.update(opened)
        return opened

    def adopt(self, chunk: Chunk, segment: str) -> None:
        """Record that loaded ``chunk``'s payload lives in committed ``segment``."""
        self.segments[segment].live[chunk.id] = chunk
        self.where[chunk.id] = segment

    def _mapped(self, seg: Segment, cid: str) -> KVPayload:
        return payload_from(lambda s: seg.tensor(f"{s}.{cid}"), self.dtype)


def segment_of(name: Any) -> str:
    """``name`` if it is a segment file name; ValueError otherwise."""
    if not isinstance(name, str) or not SEGMENT_NAME.match(name):
        raise ValueError(f"malformed segment name {str(name)[:60]!r}")
    return name


def new_store(path: Path | None, quantization: Quantization, dtype: torch.dtype, device: torch.device,
              segment_bytes: int) -> KVStore:
    """The store of a new bank: in memory (``path`` None) or a new disk bank in directory ``path``."""
    if path is None:
        return KVStore(quantization=quantization, dtype=dtype)
    return open_disk_store(path, quantization, dtype, device, segment_bytes)


def open_disk_store(path: Path, quantization: Quantization, dtype: torch.dtype, device: torch.device,
                    segment_bytes: int) -> DiskKVStore:
    """A store for a new disk bank in directory ``path``; ValueError naming the problem and the fix."""
    if device.type != "cpu":
        raise ValueError(f"a disk bank keeps K-V on the CPU (memory-mapped files), not on {device}; use "
                         "memory_device='auto' or 'cpu' with memory_path.")
    if path.exists() and not path.is_dir():
        raise ValueError(f"Cannot keep a disk bank in {path}: it is a file. Give a directory path.")
    from memlong.storage import MemoryFileError, foreign_files, is_disk_bank

    if (path / "manifest.json").exists():
        try:
            disk = is_disk_bank(path)
        except MemoryFileError:
            disk = True
        if not disk:  # (load reads a saved bank into RAM: it would not become a disk bank)
            raise ValueError(f"{path} holds a memory bank saved with save(), not a disk bank. Move it to disk: "
                             "MemoryBank(path=<a new directory>), then restore(path) and commit(); or read it into "
                             f"RAM with MemoryBank.load({str(path)!r}).")
        raise ValueError(f"{path} already holds a disk bank; reopen it with MemoryBank.load({str(path)!r}) (or "
                         "MemLong.load_memory), or give a new directory.")

    if path.is_dir():
        other = sorted(p.name for p in path.iterdir() if p.name != ".lock")
        ours = not foreign_files(path)  # only a bank's own segment files: a bank that never committed here
        if other and ours:  # killed before its first commit, or still writing: which one cannot be told apart
            raise ValueError(f"Refusing to keep a disk bank in {path}: it holds segment files of a disk bank that "
                             f"never committed ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}): one killed "
                             "before its first commit, or one still writing there. If no process is writing there, "
                             "delete them; or give a new or empty directory.")
        if other:
            raise ValueError(f"Refusing to keep a disk bank in {path}: it holds other files ({', '.join(other[:3])}"
                             f"{', ...' if len(other) > 3 else ''}). Give a new or empty directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"Cannot create the disk bank directory {path} ({exc.strerror}); give a writable path.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot keep a disk bank in {path}: the directory is read-only. Give a writable path.")
    return DiskKVStore(path, quantization=quantization, dtype=dtype, segment_bytes=segment_bytes)


_SUFFIXES = ("k", "v", "ks", "km", "vs", "vm")  # a payload's tensors (kv_payload), by their name in a segment


def segment_tensors(path: Path, record: dict[str, Any], opened: dict[str, Segment],
                     where: dict[int, str]) -> dict[str, torch.Tensor]:
    """Memory-mapped K-V of a disk bank's chunks, named as the loader reads them (``"k.<n>"``: chunk ``n`` in
    record order); ``where[n]``: chunk ``n``'s segment. MemoryFileError names a chunk without its segment."""
    tensors: dict[str, torch.Tensor] = {}
    n = 0
    try:
        for space in record.get("namespaces") or ():
            for c in space.get("chunks") or () if isinstance(space, dict) else ():
                seg = opened.get(segment_of(c.get("segment") if isinstance(c, dict) else None))
                if seg is None:
                    raise ValueError(f"chunk record {n} names a segment the manifest does not list")
                for suffix in _SUFFIXES:
                    t = seg.tensor(f"{suffix}.{c.get('id')}")
                    if t is not None:
                        tensors[f"{suffix}.{n}"] = t
                where[n] = seg.path.name
                n += 1
    except (ValueError, TypeError, AttributeError) as exc:
        raise MemoryFileError(f"Cannot load the memory bank at {path}: {exc}. The files are corrupted or were not "
                              "written by memlong.") from None
    return tensors
