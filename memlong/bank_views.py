"""Read-only views of a :class:`~memlong.memory.MemoryBank`: a chunk's copy, the ids of a namespace (all, or per
document), the namespaces, and their sizes in tokens and bytes.

Contract: every view takes the bank's read lock and returns values the caller owns (copies, new lists); none
changes the bank, none bumps retrieval counters (searching does: :meth:`MemoryBank.search`).

:class:`BankViews` is a mixin: these methods belong to :class:`MemoryBank` and use its internals.

Example:
    >>> bank.chunk_ids("docs")[:2], bank.num_tokens("docs"), bank.nbytes()
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Sequence

from memlong.bank_writes import is_staging
from memlong.records import Chunk, as_list, check_count, check_namespace

__all__ = ["BankViews"]


class BankViews:
    """Read-only views of :class:`MemoryBank` (see the module docstring)."""

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold the bank still while several reads run in this thread: ``with bank.reading():`` a search and the
        fetch (or ``get``) of its hits see one state; other threads' adds, deletes and evictions wait until the
        block ends (their slow work, like computing K-V, does not), and searches of other threads go on until a
        writer waits. Changing the bank inside the block raises RuntimeError; so does a callback run inside it (a
        LangChain ``filter`` callable) that changes the bank. Keep the block short, and do not hold it across a
        ``yield`` or ``await``: writers wait for the whole of it, and so does a Ctrl-C in the main thread (as in any
        call that reads or changes the bank, which is never left half-changed, it raises when the block ends).
        ``generate`` holds it from its search to the read of the memory, and through the re-encoding of retrieved
        tokens when ``kv_refresh`` / ``kv_reencode_head`` are on (a forward of those tokens).

        Example:
            >>> with bank.reading():
            ...     hits = bank.search("iron key", namespace="docs", k=4)
            ...     keys, values = bank.fetch([h.chunk_id for h in hits], namespace="docs")   # never a deleted id
        """
        return self._lock.read()

    def get(self, chunk_id: str, *, namespace: str = "default") -> Chunk:
        """A copy of chunk ``chunk_id`` of ``namespace`` (changing it changes nothing in the bank; its K-V tensors
        are shared and must not be written in place); :class:`UnknownChunkError` otherwise."""
        with self._lock.read():
            chunk = self._get(chunk_id, namespace)
            with self._count_lock:  # a consistent retrieval counter
                return chunk.copy()

    def stored(self, chunk_ids: Sequence[str], *, namespace: str = "default") -> list[str]:
        """Those of ``chunk_ids`` that ``namespace`` holds (in the order given): one read, no sorting.

        Example:
            >>> bank.stored(stats.chunk_ids, namespace="docs")       # what an ingest wrote and is still there
        """
        check_namespace(namespace)  # None or 5 found nothing, silently
        with self._lock.read():
            return [c for c in as_list(chunk_ids, "chunk_ids") if (chunk := self._chunks.get(c)) is not None
                    and chunk.namespace == namespace]

    def chunk_ids(self, namespace: str = "default") -> list[str]:
        """Ids of ``namespace`` in insertion order."""
        check_namespace(namespace)
        with self._lock.read():
            space = self._spaces.get(namespace)
            return sorted(space.ids, key=lambda c: self._chunks[c].order) if space else []

    def chunks(self, namespace: str = "default") -> list[Chunk]:
        """Copies of every chunk of ``namespace`` in insertion order, read at one moment (a delete running in another
        thread removes all of them or none; a loop of :meth:`get` over :meth:`chunk_ids` could meet an id it had
        just removed). K-V tensors are shared, as with :meth:`get`.

        Example:
            >>> [c.text for c in bank.chunks("docs") if c.metadata.get("lang") == "en"]
        """
        check_namespace(namespace)
        with self._lock.read():
            space = self._spaces.get(namespace)
            ordered = sorted((self._chunks[c] for c in (space.ids if space else ())), key=lambda c: c.order)
            with self._count_lock:
                return [c.copy() for c in ordered]

    def doc_chunk_ids(self, namespace: str = "default", doc_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Document id -> its chunk ids in insertion order, for ``namespace`` (one read, no chunk copies); with
        ``doc_ids``, only those documents (the ones stored; each found without a scan of the namespace).

        Example:
            >>> bank.doc_chunk_ids("docs")["intro"]     # every chunk of the document stored as "intro"
            >>> bank.doc_chunk_ids("docs", doc_ids=["intro", "gone"])   # {"intro": [...]}
        """
        check_namespace(namespace)
        docs: dict[str, list[str]] = {}
        with self._lock.read():
            space = self._spaces.get(namespace)
            if space is not None and doc_ids is not None:
                for doc in dict.fromkeys(as_list(doc_ids, "doc_ids")):
                    if doc in space.docs:
                        docs[doc] = sorted(space.docs[doc], key=lambda c: self._chunks[c].order)
                return docs
            for chunk in sorted((self._chunks[c] for c in (space.ids if space else ())), key=lambda c: c.order):
                docs.setdefault(chunk.doc_id, []).append(chunk.id)
        return docs

    def num_chunks(self, namespace: str | None = None) -> int:
        """Chunks stored in ``namespace``, or in the whole bank (without listing them)."""
        with self._lock.read():
            spaces = self._visible().values() if namespace is None else [self._spaces.get(check_namespace(namespace))]
            return sum(len(s.ids) for s in spaces if s is not None)

    def following(self, chunk_ids: Sequence[str], *, namespace: str = "default", n: int = 1) -> list[str]:
        """``chunk_ids`` with, after each, up to ``n`` chunks that continue it in its document (the next chunk of its
        ``doc_id`` stored after it, when its span starts where the previous one ends), without repeats;
        :class:`UnknownChunkError` for an unknown id.

        Example:
            >>> ids = bank.chunk_ids("docs")
            >>> bank.following([ids[3]], namespace="docs", n=1) == ids[3:5]      # one document, in order
            True
        """
        n = check_count(n, "n", "chunks to add after each; 0 adds none")  # 1.5 and None failed inside; -1 meant 0
        with self._lock.read():
            chunk_ids = as_list(chunk_ids, "chunk_ids")
            chunks = [self._get(c, namespace) for c in chunk_ids]
            if n < 1 or not chunks:
                return list(dict.fromkeys(chunk_ids))
            wanted = {c.doc_id for c in chunks}  # each document's chunks in the order they were stored: ingests of
            space = self._spaces[namespace]  # one doc_id (LlamaIndex nodes, a re-ingest) each start their spans at 0
            docs = {d: sorted((self._chunks[c] for c in space.docs[d]), key=lambda c: c.order) for d in wanted}
            out: dict[str, None] = {}
            for chunk in chunks:
                out[chunk.id] = None
                same = docs[chunk.doc_id]
                at = bisect.bisect_right(same, chunk.order, key=lambda c: c.order)
                for nxt in same[at: at + n]:
                    if nxt.span[0] != chunk.span[1]:
                        break
                    out[nxt.id], chunk = None, nxt
            return list(out)

    def namespaces(self) -> list[str]:
        """Names of the bank's namespaces."""
        with self._lock.read():
            return list(self._visible())

    def _visible(self) -> dict:
        """Name -> index of the bank's namespaces, without an adapter's upsert in flight (its staging space): what
        is listed, counted, saved and reset as the bank."""
        return {n: s for n, s in self._spaces.items() if not is_staging(n)}

    def num_tokens(self, namespace: str | None = None) -> int:
        """Tokens stored in ``namespace``, or in the whole bank (what ``capacity`` bounds per namespace)."""
        with self._lock.read():
            spaces = self._visible().values() if namespace is None else [self._spaces.get(check_namespace(namespace))]
            return sum(s.tokens for s in spaces if s is not None)

    def nbytes(self, namespace: str | None = None) -> int:
        """Bytes of stored K-V, embeddings, texts and metadata in one namespace or all (what ``max_bytes``
        bounds)."""
        with self._lock.read():
            spaces = self._visible().values() if namespace is None else [self._spaces.get(check_namespace(namespace))]
            return sum(s.nbytes for s in spaces if s is not None)
