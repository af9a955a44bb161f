"""How the adapters' async writes run their blocking work: in a thread, and cancellable.

Contract of :func:`in_thread` (LlamaIndex ``async_add`` / ``aput``, LangChain ``aadd_texts`` /
``aadd_documents`` / ``afrom_texts`` / ``afrom_documents`` / ``aadd_messages``):
    * Like ``asyncio.to_thread``: ``fn`` runs in the loop's default executor with a copy of the caller's context.
    * Cancelling the await (``asyncio.wait_for`` timing out, a client disconnecting) asks the ingest inside ``fn``
      to stop at its next step (:data:`memlong.streaming.CANCEL`); the await then waits for the thread to roll back
      before ``CancelledError`` reaches the caller, so a write cancelled while it ingests has left nothing in the
      bank. ``asyncio.to_thread`` alone kept ingesting and wrote everything.
    * A cancel that arrives once the write's final, atomic add has started lets that add finish, and the caller still
      sees ``CancelledError``: retrying is safe only for writes that name their entries (ids, node ids).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from memlong.streaming import CANCEL

__all__ = ["in_thread"]

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``await asyncio.to_thread(fn, *args, **kwargs)``, except that cancelling it stops ``fn``'s ingest
    (module doc).

    Example:
        >>> ids = await in_thread(store.add_texts, ["a long document ..."])
    """
    cancel = threading.Event()
    context = contextvars.copy_context()
    context.run(CANCEL.set, cancel)
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(context.run, fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([future])  # the rollback is done before the caller hears of the cancel
        if not future.cancelled():
            future.exception()  # read, so that asyncio does not log it as never retrieved
        raise
