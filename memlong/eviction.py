"""Which chunks a namespace gives up when it outgrows its limits (the paper's rule, kept within bounds).

Contract:
    * Order of a namespace's chunks for eviction: the oldest ``evict_oldest`` share first, then the middle
      least-retrieved first (oldest first on ties), then the newest ``keep_newest`` share (oldest first; at least
      the newest chunk when ``keep_newest > 0``).
    * Capacity (tokens): the oldest share goes, then middle chunks until at most half the capacity is used;
      if the namespace is still over ``capacity`` (a large ``keep_newest``), the newest share goes too,
      oldest first, until it fits: a namespace never stays above ``capacity``.
    * Bytes: chunks go in the same order until the bank fits ``max_bytes``.
    * ``protect``: ids that are never chosen (the chunks an atomic replace is writing). When the limits
      cannot be met without them the caller refuses the write.

These are pure functions over lists of chunks: they choose victims, the bank removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from memlong.records import Chunk
from memlong.user_warning import warn

__all__ = ["MemoryEvictionWarning", "MemoryFullError", "bytes_victims", "capacity_victims", "eviction_order", "warn_evicted"]


class MemoryFullError(ValueError):
    """An add or load that would exceed the bank's ``max_bytes`` even after evicting in its own namespace."""


class MemoryEvictionWarning(UserWarning):
    """Chunks were evicted because a namespace outgrew ``capacity`` (or the bank ``max_bytes``): the ids
    that :meth:`MemoryBank.add_chunks` returned earlier may be gone. Raise the limit to keep everything."""


def eviction_order(chunks: Iterable[Chunk], evict_oldest: float,
                   keep_newest: float) -> tuple[list[Chunk], list[Chunk], list[Chunk]]:
    """(oldest share, middle sorted least-retrieved first, newest share) of one namespace's chunks."""
    chunks = sorted(chunks, key=lambda c: c.order)
    n = len(chunks)
    # at least the newest chunk when any share is kept: with a capacity of about one chunk, evicting the middle to
    # half the capacity emptied the namespace (the smallest allowed memory_capacity kept nothing of a 451-token text);
    # and a large oldest share of a few chunks (round(4 * 0.9) = 4) is cut short of it, or it took every chunk
    n_old = min(int(round(n * evict_oldest)), n - int(keep_newest > 0))
    n_new = min(max(int(round(n * keep_newest)), int(keep_newest > 0)), n - n_old)
    middle = sorted(chunks[n_old:n - n_new], key=lambda c: (c.retrievals, c.order))
    return chunks[:n_old], middle, chunks[n - n_new:]


def capacity_victims(chunks: Sequence[Chunk], capacity: int, evict_oldest: float, keep_newest: float,
                     protect: set[str] = frozenset()) -> set[str]:
    """Ids to evict so that ``chunks`` (one namespace) fit ``capacity`` tokens; empty when they already do."""
    tokens = sum(c.n_tokens for c in chunks)
    if tokens <= capacity:
        return set()
    oldest, middle, newest = eviction_order(chunks, evict_oldest, keep_newest)
    drop: set[str] = set()
    for stage, target in ((oldest, None), (middle, capacity // 2), (newest, capacity)):
        for chunk in stage:
            if target is not None and tokens <= target:
                break
            if chunk.id not in protect:
                drop.add(chunk.id)
                tokens -= chunk.n_tokens
    return drop


def bytes_victims(chunks: Sequence[Chunk], excess: int, size: Callable[[Chunk], int], evict_oldest: float,
                  keep_newest: float, protect: set[str] = frozenset()) -> set[str]:
    """Ids of ``chunks`` to evict, in the rule's order, until ``excess`` bytes are freed (as many as possible)."""
    oldest, middle, newest = eviction_order(chunks, evict_oldest, keep_newest)
    drop: set[str] = set()
    for chunk in [*oldest, *middle, *newest]:
        if excess <= 0:
            break
        if chunk.id not in protect:
            drop.add(chunk.id)
            excess -= size(chunk)
    return drop


def warn_evicted(namespace: str, n: int, limit: str, fix: str) -> None:
    """Warn that ``n`` chunks of ``namespace`` went for ``limit`` (at the user's line: :mod:`memlong.user_warning`)."""
    if n:
        warn(f"Namespace {namespace!r} outgrew {limit}: evicted {n} chunks (oldest share first, then the least "
             f"retrieved; the paper's rule). To keep every chunk, {fix}.", MemoryEvictionWarning)
