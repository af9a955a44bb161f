"""Atomic writes of whole entries (documents, chat turns) into a namespace: all of an entry or nothing.

Contract:
    * :func:`ingest_entries` computes the entries' chunks with :meth:`MemLong.ingest` in a private staging
      namespace, then moves them into ``namespace`` with one :meth:`MemoryBank.add_chunks` call that also
      removes ``replace`` (an upsert). The write either happens whole or raises with ``namespace`` unchanged:
      the chunks being written are never evicted by their own write, and the old version is removed only
      together with the new one's arrival. The staging namespace is always reset.
    * ``entry_metadata[i]`` is stored once, on the first chunk of entry ``i`` (not on every chunk);
      ``metadatas[i]`` is stored on each of its chunks.
    * Reserved metadata keys (:data:`RESERVED_PREFIXES`) belong to memlong and its adapters; :func:`check_user_metadata`
      refuses them in users' metadata, so a document cannot forge a chunk id or a chat message.

Example:
    >>> ids = ingest_entries(ml, ["new text"], namespace="docs", doc_ids=["a"], replace=old_ids_of_a)
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from memlong.bank_writes import STAGING, STAGING_PREFIX
from memlong.model import MemLong

__all__ = ["RESERVED_PREFIXES", "check_user_metadata", "ingest_entries"]

RESERVED_PREFIXES = ("memlong_", "_memlong")


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
                   entry_metadata: Sequence[dict[str, Any]] | None = None, replace: Sequence[str] = (),
                   **ingest_options: Any) -> list[list[str]]:
    """Write ``texts`` as entries ``doc_ids`` of ``namespace`` atomically; returns each entry's chunk ids.

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
                             "Split them or raise the limits.")
        extra = dict(zip(doc_ids, entry_metadata or [{}] * len(doc_ids)))
        first = {c.doc_id: c.id for c in reversed(chunks)}
        metadata = [{**c.metadata, **(extra[c.doc_id] if first[c.doc_id] == c.id else {})} for c in chunks]
        ids = bank.add_chunks(  # one add: every entry, and the removal of the old versions, or nothing
            [c.text for c in chunks], keys=[c.keys for c in chunks], values=[c.values for c in chunks],
            namespace=namespace, doc_ids=[c.doc_id for c in chunks], spans=[c.span for c in chunks],
            metadata=metadata, tokens=[c.tokens for c in chunks] if all(c.tokens for c in chunks) else None,
            replace=replace, atomic=True)
        by_entry: dict[str, list[str]] = {d: [] for d in doc_ids}
        for cid, chunk in zip(ids, chunks):
            by_entry[chunk.doc_id].append(cid)
        return [by_entry[d] for d in doc_ids]
    finally:
        bank.reset(staging)
        STAGING.discard(staging)
