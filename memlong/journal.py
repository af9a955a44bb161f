"""Disk-bank commits that write what changed (a journal of deltas), not the whole record every time.

A disk bank's whole record (texts, spans, token ids, metadata, counters) and embeddings grow with the bank: writing
them at every commit made a commit of one chunk take 1.5 s in a bank of 50,000 chunks. Here a commit writes a
*delta* instead, when the bank has a committed state to compare with and the journal is still short:

* what a delta holds: the chunks added since the last commit (records and embeddings), the ids removed (deleted,
  evicted, reset, replaced), the retrieval counters and segments that changed, the order of the namespaces, and the
  bank's config and counters (small, written whole);
* what is compared: every committed chunk by identity (a chunk object is never reused for another chunk; a restored
  or replaced chunk is a new object, so it is removed and added), its retrieval counter and its segment. New chunks
  always come after the kept ones of their namespace (adds append, removals keep the order), which is the order a
  replay rebuilds; were it ever otherwise, the commit writes the whole record;
* when the whole record is written instead: the first commit of a bank, a journal of :data:`MAX_DELTAS` deltas, or
  more changed chunks since the last whole record than :data:`MAX_SHARE` (half) of the bank's chunks (so replaying
  at reopen costs at most about half a bank more than reading it).

:mod:`memlong.storage` writes a delta as ``delta-<id>.json`` + ``delta-<id>.safetensors`` and lists it in the
manifest (the commit point, as before); :class:`Replay` applies the deltas in order when the bank is read, and the
result is checked by the same rules as a whole record. A reopened bank equals its last commit either way
(tests/test_bank_stateful.py, tests/test_journal.py).

Example:
    >>> bank = MemoryBank(embedder=Embedder(), path="corpus.bank")
    >>> bank.add_chunks(texts, keys=keys, values=values); bank.commit()   # the whole record
    >>> bank.add_chunks(["one more"], keys=[k1], values=[v1]); bank.commit()  # a delta of one chunk
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memlong.dtypes import DTYPES
from memlong.records import Chunk, embedder_info

if TYPE_CHECKING:
    from memlong.kv_store import DiskKVStore
    from memlong.memory import MemoryBank

__all__ = ["MAX_DELTAS", "MAX_SHARE", "Commit", "Replay", "chunk_record", "committed", "header", "loaded", "prepare"]

MAX_DELTAS = 64  # deltas in a journal before a commit writes the whole record again
MAX_SHARE = 0.5  # chunk changes in a journal, as a share of the bank's chunks, before the whole record is written
HEADER = ("config", "embedder", "fingerprint", "next_order")  # what every delta carries whole

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # the one table (memlong.dtypes), inverted
View = dict[str, tuple[Chunk, int, str]]  # committed chunk id -> (its object, its retrievals, its segment)


def chunk_record(c: Chunk) -> dict[str, Any]:
    """The JSON record of one chunk (without its K-V and embedding)."""
    return {"id": c.id, "doc_id": c.doc_id, "text": c.text, "span": list(c.span), "order": c.order,
            "retrievals": c.retrievals, "metadata": c.metadata, "tokens": None if c.tokens is None else list(c.tokens)}


def header(bank: MemoryBank, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a record that is not chunks: the bank's config, embedder, model fingerprint and next order."""
    config = {"capacity": bank.capacity, "evict_oldest": bank.evict_oldest, "keep_newest": bank.keep_newest,
              "dtype": DTYPE_NAMES[bank.dtype], "max_bytes": bank.max_bytes, "quantization": bank.quantization}
    if getattr(bank._store, "segment_bytes", None) is not None:  # a disk bank reopens with the size it was made with
        config["segment_bytes"] = bank._store.segment_bytes
    return {
        "config": config,
        "embedder": embedder_info(bank.embedder),
        "fingerprint": fingerprint,
        "next_order": max((c.order for c in bank._chunks.values()), default=-1) + 1,
    }


@dataclass
class Commit:
    """What one commit writes: a delta (``delta``: its manifest counts) or the whole record (``delta`` None)."""

    record: dict[str, Any]
    tensors: list[tuple[str, torch.Tensor]]
    delta: dict[str, int] | None
    view: View


def _view(bank: MemoryBank) -> View:
    where = bank._store.where
    return {cid: (bank._chunks[cid], bank._chunks[cid].retrievals, where[cid])
            for space in bank._visible().values() for cid in space.ids}


def prepare(bank: MemoryBank, fingerprint: dict[str, Any] | None) -> Commit:
    """The commit of disk bank ``bank`` (under its write lock, after its buffer became a segment): a delta against
    its last commit when the rules of the module docstring allow one, else the whole record."""
    store: DiskKVStore = bank._store
    view, before = _view(bank), store.view
    if before is None or store.journal[0] >= MAX_DELTAS:
        return _whole(bank, fingerprint, view)
    removed = [cid for cid, (c, _, _) in before.items() if cid not in view or view[cid][0] is not c]
    added: list[dict[str, Any]] = []
    tensors: list[tuple[str, torch.Tensor]] = []
    retrievals: dict[str, int] = {}
    segments: dict[str, str] = {}
    for name, space in bank._visible().items():
        new = []
        for i, cid in enumerate(space.ids):
            c, n, seg = view[cid]
            old = before.get(cid)
            if old is None or old[0] is not c:
                new.append(i)
                continue
            if new:  # a kept chunk after a new one: not the order a replay rebuilds
                return _whole(bank, fingerprint, view)
            if n != old[1]:
                retrievals[cid] = n
            if seg != old[2]:
                segments[cid] = seg
        if new:
            chunks = [{**chunk_record(bank._chunks[space.ids[i]]), "segment": view[space.ids[i]][2]} for i in new]
            tensors.append((f"e.{len(added)}", torch.from_numpy(space.embeddings[new].copy())))
            added.append({"name": name, "chunks": chunks})
    changes = len(removed) + sum(len(a["chunks"]) for a in added) + len(retrievals) + len(segments)
    if store.journal[1] + changes > MAX_SHARE * len(view):
        return _whole(bank, fingerprint, view)
    record = {**header(bank, fingerprint), "order": list(bank._visible()), "removed": removed,
              "retrievals": retrievals, "segments": segments, "added": added}
    return Commit(record, tensors, {"changes": changes}, view)


def _whole(bank: MemoryBank, fingerprint: dict[str, Any] | None, view: View) -> Commit:
    record, tensors = bank._snapshot(None, fingerprint, inline=False)
    return Commit(record, tensors, None, view)


def committed(store: DiskKVStore, commit: Commit, name: str) -> None:
    """``commit`` is in the directory as ``name``: what the next commit compares with and appends to."""
    store.committed, store.view = name, commit.view
    store.journal = (0, 0) if commit.delta is None else (store.journal[0] + 1,
                                                         store.journal[1] + commit.delta["changes"])


def loaded(store: DiskKVStore, chunks: list[tuple[Chunk, str]]) -> None:
    """A disk bank reopened: its chunks and their segments as the files hold them (before any eviction by a smaller
    capacity, which the next commit then records) are what its next commit compares with."""
    store.view = {c.id: (c, c.retrievals, seg) for c, seg in chunks}


# ------------------------------------------------------------------ reading
def _names(x: Any, what: str) -> list[str]:
    if not isinstance(x, list) or not all(isinstance(i, str) for i in x):
        raise ValueError(f"its {what} are not a list of strings")
    return x


def _mapping(x: Any, kind: type, what: str) -> dict[str, Any]:
    if not isinstance(x, dict) or not all(type(v) is kind for v in x.values()):
        raise ValueError(f"its {what} are not a mapping of chunk ids to {kind.__name__}s")
    return x


def _spaces(items: Any, tensors: dict[str, torch.Tensor], what: str) -> list[tuple[str, list, torch.Tensor]]:
    """``[(name, chunk records, embeddings)]`` of a record's or a delta's namespace list, checked for shape."""
    if not isinstance(items, list):
        raise ValueError(f"its {what} are not a list")
    out = []
    for j, space in enumerate(items):
        if not isinstance(space, dict) or not isinstance(space.get("name"), str) or not isinstance(
                space.get("chunks"), list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str)
                                                      for c in space["chunks"]):
            raise ValueError(f"entry {j} of its {what} is malformed")
        emb = tensors.get(f"e.{j}")
        if emb is None or emb.dim() != 2 or emb.shape[0] != len(space["chunks"]) or emb.dtype != torch.float32:
            raise ValueError(f"the embeddings of entry {j} of its {what} are missing or not ({len(space['chunks'])}, "
                             "dim) float32")
        out.append((space["name"], space["chunks"], emb))
    return out


class Replay:
    """The bank a whole record and its deltas describe: ``Replay(record, tensors)``, :meth:`apply` each delta in
    order (ValueError naming what does not fit; the caller names the file), then :meth:`result`.

    Chunks are kept as entries (record, embedding source, row) while the deltas apply: a removal forgets an entry, a
    counter or segment change edits it in place, and the namespaces' lists and the embeddings are built once at the
    end, so replaying costs one pass over the bank plus the changes (a compaction's delta moves many chunks). Only
    the shape of the deltas is checked here: the result goes through the same checks as a whole record
    (:func:`memlong.records.parse_namespaces`)."""

    def __init__(self, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.record, self.sources = record, []
        self.rest = {k: t for k, t in tensors.items() if not k.startswith("e.")}  # a disk bank has none
        self.spaces: dict[str, list[tuple[dict, int, int, str]]] = {}  # name -> entries, live or not, in order
        self.alive: dict[str, tuple[dict, int, int, str]] = {}  # chunk id -> its live entry
        self.live: dict[str, int] = {}  # name -> live chunks
        self._add(record.get("namespaces"), tensors, "namespaces")

    def _add(self, items: Any, tensors: dict[str, torch.Tensor], what: str) -> None:
        for name, chunks, emb in _spaces(items, tensors, what):
            self.sources.append(emb)
            rows = self.spaces.setdefault(name, [])
            for row, c in enumerate(chunks):
                if c["id"] in self.alive:
                    raise ValueError(f"chunk id {c['id'][:100]!r} appears twice")
                entry = self.alive[c["id"]] = (c, len(self.sources) - 1, row, name)
                rows.append(entry)
            self.live[name] = self.live.get(name, 0) + len(chunks)

    def apply(self, change: dict[str, Any], added: dict[str, torch.Tensor]) -> None:
        """Apply one delta (its record ``change``, its embeddings ``added``)."""
        order, removed = _names(change.get("order"), "namespaces"), set(_names(change.get("removed"), "removed ids"))
        retrievals = _mapping(change.get("retrievals"), int, "retrieval counters")
        segments = _mapping(change.get("segments"), str, "segments")
        unknown = {cid for cid in removed if cid not in self.alive}  # per id: no pass over the bank per delta
        unknown |= {cid for cid in (*retrievals, *segments) if cid not in self.alive or cid in removed}  # kept ones
        if unknown:
            raise ValueError(f"it names chunk {sorted(unknown)[0][:100]!r}, which the bank does not hold")
        for cid in removed:
            self.live[self.alive.pop(cid)[3]] -= 1
        for cid, n in retrievals.items():
            self.alive[cid][0]["retrievals"] = n
        for cid, seg in segments.items():
            self.alive[cid][0]["segment"] = seg
        self._add(change.get("added"), added, "added chunks")
        if len(set(order)) != len(order) or any(self.live.get(n) for n in set(self.spaces) - set(order)):
            raise ValueError("its namespace order repeats a name or leaves out a namespace that holds chunks")
        embedder = change.get("embedder")
        if not isinstance(embedder, dict) or type(embedder.get("dim")) is not int or embedder["dim"] < 1:
            raise ValueError("its embedder has no dimension")
        self.spaces = {name: self.spaces.get(name, []) for name in order}
        self.record = {**self.record, **{k: change.get(k) for k in HEADER}}

    def result(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The record and tensors of the bank after every delta applied, as a whole record has them."""
        tensors, merged = dict(self.rest), []
        dim = self.record["embedder"]["dim"]
        for j, (name, entries) in enumerate(self.spaces.items()):
            entries = [e for e in entries if self.alive.get(e[0]["id"]) is e]  # removed ones, and replaced ids, go
            runs: list[tuple[int, list[int]]] = []  # (source, rows): consecutive entries of one source
            for _, src, row, _ in entries:
                if runs and runs[-1][0] == src:
                    runs[-1][1].append(row)
                else:
                    runs.append((src, [row]))
            parts = [self.sources[src][torch.tensor(rows)] for src, rows in runs]
            try:
                tensors[f"e.{j}"] = torch.cat(parts) if parts else torch.zeros(0, dim)
            except RuntimeError as exc:  # embeddings of another width or dtype
                raise ValueError(f"the embeddings of namespace {name[:100]!r} do not join ({exc})") from None
            merged.append({"name": name, "chunks": [e[0] for e in entries]})
        return {**self.record, "namespaces": merged}, tensors
