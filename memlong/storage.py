"""On-disk format of a memory bank: safetensors for tensors, JSON for the rest, committed atomically.

A bank directory (format ``"memlong-bank"``, version 1; version 2 adds K-V segments) holds::

    DIR/manifest.json              the commit point: format, version, and name, size and sha256 of the two files below
    DIR/bank-<id>.json             config, embedder, model fingerprint, counters, namespaces and chunk records
                                   (id, doc id, text, span, order, retrievals, metadata)
    DIR/tensors-<id>.safetensors   "k.<i>", "v.<i>": K-V of chunk i (n_source_layers, n_kv_heads, tokens, head_dim);
                                   "e.<j>": (n_chunks, dim) float32 embeddings of namespace j
    DIR/seg-<id>.safetensors       (version 2: a disk bank, :mod:`memlong.kv_store`) K-V segments; tensors
                                   "<suffix>.<chunk id>"; the record names each chunk's segment and the
                                   manifest names every segment with its size and sha256
    DIR/delta-<id>.json            (version 3: a disk bank's journal) what one commit changed: chunks added,
    DIR/delta-<id>.safetensors     removed, retrieval counters and segments changed, the namespaces' order, the
                                   config and counters; "e.<j>": embeddings of the chunks added to namespace j. The
                                   manifest lists them in commit order after the two files above, each pair with
                                   size and sha256; :mod:`memlong.journal` writes and replays them
    DIR/.lock                      advisory lock (POSIX): one writer at a time, and readers never see a cleanup

Saving writes the two data files under fresh names, fsyncs them, writes ``manifest.json.tmp``, fsyncs it,
``os.replace``-s it over ``manifest.json`` (atomic on POSIX and Windows), fsyncs the directory, and only then
deletes the files no manifest names. A save that dies at any point leaves either the old manifest or the new
one, each naming complete, fsynced files; the next save removes the leftovers. (Renaming a whole temporary
directory over the old one cannot be done atomically on POSIX, so the manifest file is the commit point.)

Loading reads a size-capped manifest, checks format, version, file names, sizes and sha256 digests, then parses
the JSON and reads the tensors with safetensors (no pickle, no ``torch.load``). Segments (version 2) are checked
by size and header when opened, so a bank of many gigabytes opens in moments; ``verify=True`` also checks every
segment's sha256 (reads them all). Every failure surfaces as
:class:`MemoryFileError`; the checks on what the files *mean* live with the bank (:mod:`memlong.memory`).

Example:
    >>> write_bank("bank", {"namespaces": []}, [("e.0", torch.zeros(0, 384))])
    >>> record, tensors, segments, commit = read_bank("bank")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from memlong.rwlock import dir_lock

__all__ = ["FORMAT", "SEGMENT_NAME", "VERSION", "MemoryFileError", "check_not_disk_bank", "committed", "foreign_files",
           "is_disk_bank",
           "read_bank", "record_name", "write_bank", "write_segment"]

FORMAT = "memlong-bank"
VERSION = 1
SEGMENT_VERSION = 2  # a manifest that also names K-V segments (a disk bank)
JOURNAL_VERSION = 3  # a disk bank's manifest that also lists deltas (commits written as what changed)
MANIFEST = "manifest.json"
_MANIFEST_LIMIT = 256 << 20  # about 150 bytes per segment: 1.7 million segments; never read more than this (it
# was 1 MiB: a disk bank of 7,000 segments committed a manifest it then refused to reopen)
_DATA_NAME = re.compile(r"^(bank-[0-9a-f]{16}\.json|tensors-[0-9a-f]{16}\.safetensors)\Z")
_DELTA_NAME = re.compile(r"^delta-[0-9a-f]{16}\.(json|safetensors)\Z")
_OURS = re.compile(r"^((bank|delta)-[0-9a-f]{16}\.json|(tensors|seg|delta)-[0-9a-f]{16}\.safetensors|"
                   r"manifest\.json\.tmp)\Z")
SEGMENT_NAME = re.compile(r"^seg-[0-9a-f]{16}\.safetensors\Z")
_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
           torch.uint8: "U8"}


class MemoryFileError(ValueError):
    """A memory bank directory that cannot be loaded: missing, truncated, corrupted, of an unknown format or
    version, or made by a different model, config or embedder. The message names the file and the fix."""


# ------------------------------------------------------------------ writing
class _HashingWriter:
    """Write-through file wrapper that counts bytes and computes their sha256."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.size, self.sha = fh, 0, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes


def _write_safetensors(out: _HashingWriter, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Stream ``tensors`` in the safetensors layout (8-byte header size, JSON header, raw little-endian data),
    one tensor at a time, so saving never holds a second copy of the bank in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT}}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _DTYPES:
            raise ValueError(f"Cannot store tensor {name!r} of dtype {t.dtype}; use one of {sorted(map(str, _DTYPES))}.")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
    for _, t in tensors:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            out.write(memoryview(flat.view(torch.uint8).numpy()))


def _write_file(path: Path, fill: Callable[[_HashingWriter], None]) -> dict[str, Any]:
    """Create ``path``, fill it, flush and fsync it; returns its manifest entry."""
    with open(path, "xb") as fh:
        out = _HashingWriter(fh)
        fill(out)
        fh.flush()
        os.fsync(fh.fileno())
    return {"name": path.name, "bytes": out.size, "sha256": out.sha.hexdigest()}


def write_segment(path: Path, tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Write one immutable K-V segment (safetensors, fsynced) and return its manifest entry. Tensors are laid out
    widest dtype first so that every tensor starts at a multiple of its element size (memory maps view them)."""
    ordered = sorted(tensors, key=lambda item: -item[1].element_size())
    try:
        return _write_file(path, lambda out: _write_safetensors(out, ordered))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def foreign_files(path: str | os.PathLike) -> list[str]:
    """Names of the files in directory ``path`` that keep a bank from being saved there: anything but a bank's own
    files (of a finished or an interrupted save), in a directory without a bank manifest; sorted."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST).exists():
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in (MANIFEST, ".lock") and not _OURS.match(p.name))


_ANY = object()  # write_bank(expect=...): replace whatever bank is there (a save)


def record_name(token: str, delta: bool = False) -> str:
    """The record file a save or commit named ``token`` writes (what :func:`committed` returns once it is in)."""
    return f"{'delta' if delta else 'bank'}-{token}.json"


def committed(path: str | os.PathLike) -> str | None:
    """The commit a bank directory holds: the name of the newest record file its manifest names (its last delta's,
    or the whole record's; unique per save or commit); None without a manifest, ``"?"`` for a manifest that cannot
    be read."""
    file = Path(path) / MANIFEST
    if not file.is_file():  # read_bytes() of a FIFO waited forever
        return "?" if os.path.lexists(file) else None
    try:
        with open(file, "rb") as fh:
            manifest = json.loads(fh.read(_MANIFEST_LIMIT + 1))
        return (manifest.get("journal") or [{"record": manifest["files"][0]}])[-1]["record"]["name"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):  # (JSON of another shape)
        return "?"


def _check_target(path: Path) -> None:
    """ValueError unless ``path`` can take a bank: a new or empty directory, or one holding only a bank's files."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"Cannot save a memory bank to {path}: it is a file. Give a directory path.")
    path.mkdir(parents=True, exist_ok=True)
    strangers = foreign_files(path)
    if strangers:
        raise ValueError(f"Refusing to save a memory bank into {path}: it already holds other files "
                         f"({', '.join(sorted(strangers)[:3])}...). Give a new or empty directory.")
    odd = [p.name for p in path.iterdir() if (p.name == MANIFEST or _OURS.match(p.name))
           and (p.is_symlink() or not p.is_file())]
    if odd:  # found now, not after the commit when the old files are cleaned up
        raise ValueError(f"Refusing to save a memory bank into {path}: {odd[0]} is not a regular file (a folder or "
                         "link named like a bank file). Remove it, or give another directory.")


def check_not_disk_bank(path: Path) -> None:
    """ValueError where a save would replace a disk bank (and delete its segments); a corrupt bank may be replaced."""
    with contextlib.suppress(MemoryFileError):
        if committed(path) is not None and is_disk_bank(path):
            raise ValueError(f"Refusing to save a memory bank into {path}: a disk bank (MemoryBank(path=...)) lives "
                             "there; a save would replace it and delete its segments. Save to a new directory, or "
                             "open that bank with MemoryBank.load(path) and add to it.")


def write_bank(path: str | os.PathLike, record: dict[str, Any], tensors: Sequence[tuple[str, torch.Tensor]],
               segments: Sequence[dict[str, Any]] | None = None, *, expect: Any = _ANY,
               token: str | None = None, delta: dict[str, Any] | None = None) -> str:
    """Atomically replace the bank stored in directory ``path`` with ``record`` (JSON-able) and ``tensors``;
    returns the new commit (:func:`committed`).

    ``delta`` (a disk bank's commit of what changed, :mod:`memlong.journal`): ``record`` and ``tensors`` are a delta,
    written as ``delta-<token>.*`` and appended to the journal of the bank there (``expect`` must be given); the
    manifest keeps its whole record and earlier deltas, and its journal entry is ``delta`` (counts it carries) plus
    the two files.

    ``segments``: manifest entries of K-V segment files already written (fsynced) in ``path`` that the record
    refers to (a disk bank, format version 2); every other segment file there is removed after the commit.
    ``expect``: the commit the writer last saw there (a disk bank's open or last commit; None: no bank yet); if
    another writer committed since, nothing is written (its segments would be removed). ``token``: 16 hex digits
    naming the new files (default: random), so that a caller knows the new commit (``bank-<token>.json``) even when
    the disk fails after the commit point.

    Raises:
        ValueError: ``path`` is a file, a non-empty directory that holds no memory bank (never scribbled on), (a
            save) a disk bank's, or (with ``expect``) a bank another writer committed to since.
        OSError: the disk refused a write; the previous bank stays loadable and the partial files are removed.
    """
    path = Path(path)
    _check_target(path)
    if delta is not None and (segments is None or expect is _ANY):
        raise ValueError("a delta is a disk bank's commit: it needs the segments and the commit it follows.")
    version = VERSION if segments is None else SEGMENT_VERSION if delta is None else JOURNAL_VERSION
    body = json.dumps({"format": FORMAT, "version": version, **record}, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()
    token = token or secrets.token_hex(8)
    names = [record_name(token, delta is not None), f"{'delta' if delta is not None else 'tensors'}-{token}.safetensors"]
    with dir_lock(path, exclusive=True):
        if expect is _ANY and segments is None:
            check_not_disk_bank(path)
        if expect is not _ANY and committed(path) != expect:
            raise ValueError(f"The disk bank at {path} was committed by another writer (another process, or another "
                             "MemoryBank / MemLong on the same memory_path) since this bank opened it; committing "
                             "now would delete what that writer stored. Nothing was written. Keep one writer per "
                             "directory: reopen it with MemoryBank.load(path) and redo the changes there.")
        base = _manifest(path)[1:] if delta is not None else None  # (files, segments, journal) it extends
        try:
            files = [_write_file(path / names[0], lambda out: out.write(body)),
                     _write_file(path / names[1], lambda out: _write_safetensors(out, tensors))]
            head: dict[str, Any] = {"format": FORMAT, "version": VERSION, "files": files}
            if segments is not None:
                head.update(version=SEGMENT_VERSION, segments=list(segments))
            if delta is not None:
                head.update(version=JOURNAL_VERSION, files=base[0],
                            journal=[*base[2], {"record": files[0], "tensors": files[1], **delta}])
            manifest = json.dumps(head, indent=1).encode()
            if len(manifest) > _MANIFEST_LIMIT:  # (readers refuse it: the bank would not reopen)
                raise ValueError(f"The memory bank at {path} would need a manifest of {len(manifest)} bytes for its "
                                 f"{len(segments or ())} segment files, over the {_MANIFEST_LIMIT} bytes a manifest "
                                 "may hold. Nothing was written: the directory holds its last commit. Split the "
                                 "bank's namespaces across several disk banks.")
            tmp = path / (MANIFEST + ".tmp")
            tmp.unlink(missing_ok=True)
            _write_file(tmp, lambda out: out.write(manifest))
            if segments:
                _fsync_dir(path)  # segments' directory entries are durable before a manifest names them
            os.replace(tmp, path / MANIFEST)  # the commit point
        except BaseException:  # also Ctrl-C: right after the commit point it would have deleted the new bank's files
            if committed(path) not in (names[0], "?"):  # ("?": unreadable now; the next save removes leftovers)
                for name in names:
                    (path / name).unlink(missing_ok=True)
            raise
        _fsync_dir(path)  # after the commit point: a failure here must not remove the files the manifest names
        kept = set(names) | {e["name"] for e in segments or ()}
        if base is not None:
            kept |= {e["name"] for e in base[0]} | {d[k]["name"] for d in base[2] for k in ("record", "tensors")}
        for p in path.iterdir():  # files of older or interrupted saves
            keep = p.name in kept
            if _OURS.match(p.name) and not keep and not p.is_symlink() and p.is_file():
                p.unlink(missing_ok=True)
    return names[0]


# ------------------------------------------------------------------ reading
def _fail(path: Path, problem: str) -> MemoryFileError:
    return MemoryFileError(f"Cannot load the memory bank at {path}: {problem}")


def _manifest(path: Path) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """The manifest's version, its two data files, (version 2 and 3) its segments and (version 3) its journal (the
    deltas, oldest first: ``{"record": entry, "tensors": entry, "changes": n}``), all checked for shape."""
    file = path / MANIFEST
    if not file.is_file():  # a folder, a FIFO (which open() would wait on forever) or a link to nothing
        raise _fail(path, f"{MANIFEST} is not a regular file" if os.path.lexists(file) else f"there is no {MANIFEST}"
                    ". Point at a directory written by MemoryBank.save() / MemLong.save_memory().")
    with open(file, "rb") as fh:
        raw = fh.read(_MANIFEST_LIMIT + 1)
    if len(raw) > _MANIFEST_LIMIT:
        raise _fail(path, f"{MANIFEST} is larger than {_MANIFEST_LIMIT} bytes, so it is not a memlong manifest.")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, an integer of >4300 digits
        raise _fail(path, f"{MANIFEST} is not valid JSON ({exc}); the file is corrupted.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(path, f"{MANIFEST} does not describe a {FORMAT!r} directory.")
    version = manifest.get("version")
    if version not in (VERSION, SEGMENT_VERSION, JOURNAL_VERSION) or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > JOURNAL_VERSION
        raise _fail(path, f"format version {version!r} is not supported (this memlong reads versions {VERSION} to "
                          f"{JOURNAL_VERSION})" + ("; upgrade memlong to read it." if newer else "."))
    files = manifest.get("files")
    if not isinstance(files, list) or len(files) != 2:
        raise _fail(path, f"{MANIFEST} must list exactly two files.")
    segments = manifest.get("segments") if version != VERSION else None
    if version != VERSION and not isinstance(segments, list):
        raise _fail(path, f"{MANIFEST} of version {version} must list its K-V segments.")
    journal = manifest.get("journal") if version == JOURNAL_VERSION else []
    if not isinstance(journal, list) or not all(
            isinstance(d, dict) and set(d) == {"record", "tensors", "changes"} and type(d["changes"]) is int
            and d["changes"] >= 0 for d in journal):
        raise _fail(path, f"{MANIFEST} of version {JOURNAL_VERSION} has a malformed journal.")
    deltas = [d[k] for d in journal for k in ("record", "tensors")]
    for entry in files + (segments or []) + deltas:
        pattern = _DATA_NAME if entry in files else _DELTA_NAME if any(entry is e for e in deltas) else SEGMENT_NAME
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and pattern.match(entry["name"])
              and type(entry.get("bytes")) is int and entry["bytes"] >= 0
              and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
        if not ok:
            raise _fail(path, f"{MANIFEST} has a malformed file entry {str(entry)[:200]}.")
    if not all(a["name"].endswith(".json") and b["name"].endswith(".safetensors")
               for a, b in [files] + [(d["record"], d["tensors"]) for d in journal]):
        raise _fail(path, f"{MANIFEST} must name a bank JSON file and then a safetensors file.")
    if segments is not None and len({e["name"] for e in segments}) != len(segments):
        raise _fail(path, f"{MANIFEST} names a segment twice.")
    if len({e["name"] for e in deltas}) != len(deltas):
        raise _fail(path, f"{MANIFEST} names a delta file twice.")
    return version, files, segments, journal


def is_disk_bank(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds a disk bank (K-V in segments, written by ``MemoryBank.commit``) rather than
    a saved one (``MemoryBank.save``); reads only the manifest.

    Raises:
        MemoryFileError: no bank there, or a malformed manifest.
    """
    return _manifest(Path(path))[2] is not None


def _verified(path: Path, entry: dict[str, Any], digest: bool = True) -> Path:
    """Check a data file's size and (``digest``) sha256 against its manifest entry (streamed, never all in
    memory)."""
    file = path / entry["name"]
    if not file.is_file():
        raise _fail(path, f"{entry['name']} named by {MANIFEST} is missing; the directory was changed by hand.")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise _fail(path, f"{entry['name']} has {size} bytes, the manifest says {entry['bytes']}: the file is "
                          "truncated or was replaced.")
    if not digest:
        return file
    sha = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    if sha.hexdigest() != entry["sha256"]:
        raise _fail(path, f"{entry['name']} does not match its sha256 checksum: the file is corrupted.")
    return file


def _read_pair(path: Path, files: Sequence[dict[str, Any]], version: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON record and the tensors of a record file and its safetensors file (checked against their entries)."""
    from safetensors.torch import load_file

    record_file, tensor_file = (_verified(path, f) for f in files)
    try:
        record = json.loads(record_file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, an integer of >4300 digits
        raise _fail(path, f"{record_file.name} is not valid JSON ({exc}).") from None
    try:
        tensors = load_file(tensor_file, device="cpu")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # SafetensorError, and a Rust panic surfaces as a BaseException
        raise _fail(path, f"{tensor_file.name} is not a valid safetensors file ({exc}).") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != version:
        raise _fail(path, f"{record_file.name} is not a {FORMAT!r} version {version} record.")
    return record, tensors


def read_bank(path: str | os.PathLike, *, verify: bool = False
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[dict[str, Any]] | None, str]:
    """The JSON record, the tensors (on the CPU), the K-V segment entries (None: a version-1 bank, all K-V
    among the tensors) and the commit (:func:`committed`) of the bank in directory ``path``, after integrity
    checks (segments: size only, unless ``verify``; deltas: always by sha256).

    A journal (version 3) is replayed onto the whole record (:class:`memlong.journal.Replay`): the record returned is
    the bank as of its last commit, with ``record["journal"] = {"deltas": n, "changes": m}`` (what was replayed).

    Raises:
        MemoryFileError: no bank there, or any file missing, truncated, corrupted or of another format/version.
    """
    from memlong.journal import Replay

    path = Path(path)
    if not path.is_dir():
        raise _fail(path, ("it is a file, not a bank's directory" if path.exists() else "no such directory") +
                    ". Save a bank there first with MemoryBank.save() / MemLong.save_memory().")
    try:
        with dir_lock(path, exclusive=False):
            version, files, segments, journal = _manifest(path)
            for entry in segments or ():
                _verified(path, entry, digest=verify)
            record, tensors = _read_pair(path, files, min(version, SEGMENT_VERSION))
            record.pop("journal", None)  # only the manifest says what was replayed (a record's own key is not trusted)
            if journal:
                name = files[0]["name"]
                try:
                    replay = Replay(record, tensors)
                    for delta in journal:
                        name = delta["record"]["name"]
                        replay.apply(*_read_pair(path, [delta["record"], delta["tensors"]], JOURNAL_VERSION))
                    record, tensors = replay.result()
                except ValueError as exc:
                    if isinstance(exc, MemoryFileError):
                        raise
                    raise _fail(path, f"{name} does not apply to the bank ({exc}); the files are corrupted or were "
                                      "not written by memlong.") from None
                record["journal"] = {"deltas": len(journal), "changes": sum(d["changes"] for d in journal)}
    except MemoryFileError:
        raise
    except (OSError, MemoryError, RecursionError) as exc:
        raise _fail(path, f"{type(exc).__name__}: {exc}") from None
    return record, tensors, segments, (journal[-1]["record"] if journal else files[0])["name"]
