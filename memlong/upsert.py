"""Atomic writes of whole entries (documents, chat turns) into a namespace: all of an entry or nothing.

Contract:
    * :func:`ingest_entries` computes the entries' chunks with :meth:`MemLong.ingest` in a private staging
      namespace, then moves them into ``namespace`` with one :meth:`MemoryBank.add_chunks` call that also
      removes ``replace`` (an upsert). The write either happens whole or raises with ``namespace`` unchanged:
      the chunks being written are never evicted by their own write, and the old version is removed only
      together with the new one's arrival. The staging namespace is always reset.
    * ``replace`` may be a callable: it is called (under :func:`entry_lock`) just before that add, so that two
      upserts of one id from two threads both see the other's write (the last one wins) instead of both keeping
      their own old version. Adapters take :func:`entry_lock` around their deletes too.
    * An entry (its chunks carry :data:`ENTRY_KEY`) that a write's eviction cut loses its other chunks in
      the same call, with a :class:`MemoryEvictionWarning` counting them: an entry is read back whole or not at
      all. Documents ingested into the namespace otherwise are evicted chunk by chunk, as always.
    * The staging space is exempt from ``max_bytes`` (the final add counts the entries against it, evicting other
      chunks to make room), so a bank near its byte limit keeps taking entries.
    * ``entry_metadata[i]`` is stored once, on the first chunk of entry ``i`` (not on every chunk);
      ``metadatas[i]`` is stored on each of its chunks.
    * Reserved metadata keys (:data:`RESERVED_PREFIXES`) belong to memlong and its adapters; :func:`check_user_metadata`
      refuses them in users' metadata, so a document cannot forge a chunk id or a chat message.

Example:
    >>> ids = ingest_entries(ml, ["new text"], namespace="docs", doc_ids=["a"], replace=old_ids_of_a)
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from memlong.bank_writes import STAGING, STAGING_PREFIX
from memlong.eviction import warn_evicted
from memlong.model import MemLong
from memlong.streaming import check_cancelled

__all__ = ["ENTRY_KEY", "RESERVED_PREFIXES", "check_user_metadata", "entry_lock", "ingest_entries", "ingest_replacing"]

RESERVED_PREFIXES = ("memlong_", "_memlong")
ENTRY_KEY = "_memlong_entry"  # on each chunk of an entry: the doc id is a whole entry (evicted whole)

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bank -> {namespace: lock}
_LOCKS_LOCK = threading.Lock()


def entry_lock(bank: Any, namespace: str) -> threading.RLock:
    """The lock that orders entry writes (upserts, deletes by entry id) to ``namespace`` of ``bank`` in this
    process: the adapters read which chunks an id owns and change them under it."""
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(bank, {}).setdefault(namespace, threading.RLock())


def check_user_metadata(metadata: Mapping[str, Any] | None, what: str = "metadata") -> dict[str, Any]:
    """A copy of users' ``metadata``; ValueError if a key is reserved for memlong's own bookkeeping."""
    metadata = dict(metadata or {})
    reserved = [k for k in metadata if isinstance(k, str) and k.startswith(RESERVED_PREFIXES)]
    if reserved:
        raise ValueError(f"{what} key {reserved[0]!r} is reserved for memlong (keys starting with "
                         f"{' or '.join(RESERVED_PREFIXES)}); rename it. Nothing was added.")
    return metadata


def ingest_entries(ml: MemLong, texts: Sequence[str], *, namespace: str, doc_ids: Sequence[str],
                   metadatas: Sequence[dict[str, Any]] | None = None,
                   entry_metadata: Sequence[dict[str, Any]] | None = None,
                   replace: Iterable[str] | Callable[[], Iterable[str]] = (), **ingest_options: Any) -> list[list[str]]:
    """Write ``texts`` as entries ``doc_ids`` of ``namespace`` atomically; returns each entry's chunk ids.

    ``replace``: chunk ids removed in the same add (an upsert), or a callable returning them, called under
    :func:`entry_lock` just before the add.

    Raises:
        ValueError: bad input, or entries that cannot fit the namespace's capacity (nothing changes).
        memlong.MemoryFullError: the entries do not fit the bank's ``max_bytes`` (nothing changes).
        memlong.UnknownChunkError: a ``replace`` id not in ``namespace`` (nothing changes).
    """
    doc_ids = list(doc_ids)
    for name, given in (("doc_ids", doc_ids), ("metadatas", metadatas), ("entry_metadata", entry_metadata)):
        if given is not None and len(given) != len(texts):
            raise ValueError(f"ingest_entries got {len(texts)} texts and {len(given)} {name}; give one per text.")
    if len(set(doc_ids)) != len(doc_ids):
        twice = next(d for d in doc_ids if doc_ids.count(d) > 1)
        raise ValueError(f"doc_ids name {twice!r} twice; each entry needs its own id (nothing was added).")
    extra = dict(zip(doc_ids, entry_metadata or [{}] * len(doc_ids)))
    metadatas = [{**(m or {}), ENTRY_KEY: True} for m in (metadatas or [{}] * len(texts))]  # on every chunk
    ids, chunks = ingest_replacing(ml, texts, namespace=namespace, doc_ids=doc_ids, metadatas=metadatas,
                                   first_metadata=extra, replace=replace, whole_entries=True, **ingest_options)
    by_entry: dict[str, list[str]] = {d: [] for d in doc_ids}
    for cid, doc_id in zip(ids, chunks):
        by_entry[doc_id].append(cid)
    return [by_entry[d] for d in doc_ids]


def ingest_replacing(ml: MemLong, texts: Sequence[str], *, namespace: str, doc_ids: Sequence[str],
                     metadatas: Sequence[dict[str, Any]] | None = None,
                     first_metadata: Mapping[str, dict[str, Any]] | None = None,
                     replace: Iterable[str] | Callable[[], Iterable[str]] = (), whole_entries: bool = False,
                     **ingest_options: Any) -> tuple[list[str], list[str]]:
    """:func:`ingest_entries` without its one-entry-per-id rule (LlamaIndex nodes of one document share their
    ``doc_id``): returns the new chunk ids and each one's doc id. ``first_metadata[doc_id]`` is added to the first
    chunk of that doc id only; ``whole_entries``: an entry (chunks with :data:`ENTRY_KEY`) that the add's
    eviction cut is deleted whole."""
    bank = ml.bank
    staging = f"{STAGING_PREFIX}{uuid.uuid4().hex}"  # the entries are ingested here first, then moved in one add
    STAGING.add(staging)
    try:
        stats = ml.ingest(list(texts), namespace=staging, doc_ids=list(doc_ids), metadatas=metadatas,
                          **ingest_options)
        chunks = bank.chunks(staging)  # copies, their K-V kept: the staging space goes before the final add, so
        bank.reset(staging)            # that add counts every namespace against max_bytes
        if stats.evicted or [c.id for c in chunks] != stats.chunk_ids:
            raise ValueError(f"The entries ({stats.tokens} tokens) do not fit the bank's limits (capacity "
                             f"{bank.capacity} tokens per namespace, max_bytes={bank.max_bytes}); nothing was added. "
                             "Write fewer at a time, or raise memory_capacity (MemLongConfig) or max_bytes.")
        check_cancelled()  # the last point where a cancelled async write leaves nothing
        extra = first_metadata or {}
        first = {c.doc_id: c.id for c in reversed(chunks)}
        metadata = [{**c.metadata, **(extra.get(c.doc_id, {}) if first[c.doc_id] == c.id else {})} for c in chunks]
        with entry_lock(bank, namespace):
            before = bank.doc_chunk_ids(namespace) if whole_entries else {}
            ids = bank.add_chunks(  # one add: every entry, and the removal of the old versions, or nothing
                [c.text for c in chunks], keys=[c.keys for c in chunks], values=[c.values for c in chunks],
                namespace=namespace, doc_ids=[c.doc_id for c in chunks], spans=[c.span for c in chunks],
                metadata=metadata, tokens=[c.tokens for c in chunks] if all(c.tokens for c in chunks) else None,
                replace=list(replace() if callable(replace) else replace), atomic=True)
            if whole_entries:
                _drop_cut(bank, namespace, before, set(first))
        return ids, [c.doc_id for c in chunks]
    finally:
        try:
            bank.reset(staging)
        finally:  # never left hidden for good
            STAGING.discard(staging)


def _drop_cut(bank: Any, namespace: str, before: dict[str, list[str]], written: set[str]) -> None:
    """Delete what is left of entries (chunks with :data:`ENTRY_KEY`) that the add's eviction cut (any chunk, head
    or middle: eviction takes the least retrieved too); ``before``: each doc id's chunks before the add (one read
    without copies: an add to a namespace of thousands of chunks stays cheap); ``written``: the entries it wrote."""
    now = bank.doc_chunk_ids(namespace)
    cut = [d for d, ids in before.items() if d not in written and d in now and now[d] != ids]
    rest = [cid for d in cut if bank.get(now[d][0], namespace=namespace).metadata.get(ENTRY_KEY) for cid in now[d]]
    if rest:
        bank.delete(rest, namespace=namespace)
        warn_evicted(namespace, len(rest), "memory_capacity / max_bytes (the rest of entries it cut)",
                     "raise memory_capacity or max_bytes")
