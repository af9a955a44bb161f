"""The chat memories' commit after each change on a disk bank: all of a change or nothing.

A change is made in memory first (an ingest), then committed. A commit that does not land (another writer committed
to the directory since, the disk failed before the commit point, Ctrl-C) would leave the change in memory only, and
the caller, told of the error, would retry it and store it twice: the chunks the change added are deleted again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memlong.storage import committed

__all__ = ["check_commit", "commit_change"]


def check_commit(bank: Any, commit: bool | None, who: str) -> None:
    """ValueError for ``commit=True`` on a bank kept in memory (every later change would fail on its commit)."""
    if commit and bank.path is None:
        raise ValueError(f"{who}(commit=True) needs a disk bank (MemLongConfig(memory_path=...) or MemoryBank(path="
                         "...)); this bank keeps K-V in memory: save it with ml.save_memory(path) instead.")


def commit_change(bank: Any, commit: bool | None, namespace: str, added: Sequence[str] = ()) -> None:
    """Commit ``bank`` if ``commit`` (``None``: if it is a disk bank); if the commit does not land, delete the chunk
    ids ``added`` to ``namespace`` by the change again, then raise its error."""
    if not (commit or (commit is None and bank.path is not None)):
        return
    before = committed(bank.path)
    try:
        bank.commit()
    except BaseException:
        if added and committed(bank.path) == before:  # (not landed: the directory holds the commit it held)
            bank.delete(list(added), namespace=namespace)
        raise
