"""``warn``: a warning attributed to the first caller outside memlong, the user's own line, however deep the call.

A fixed ``stacklevel`` is right for one path only: an eviction warned from ``MemoryBank.add_chunks`` pointed at the
user's line when they called it, but into ``streaming.py`` through ``MemLong.ingest`` and into ``upsert.py`` through
a LangChain store (review finding). Python 3.12's ``skip_file_prefixes`` does this walk itself; 3.10 and 3.11 lack it.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, name) + os.sep for name in ("memlong", "memlong_integrations"))
_ROUTES = ("langchain", "langgraph", "llama_index")  # frameworks calling the adapters for the user (add_documents,
# index; langchain_classic's ParentDocumentRetriever): every loaded package whose name starts so


def _skipped() -> tuple[str, ...]:
    routes = [os.path.join(path, "") for name, module in list(sys.modules.items())
              if "." not in name and name.startswith(_ROUTES) for path in getattr(module, "__path__", ())]
    return _OURS + tuple(routes)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` with the stack level of the first frame outside memlong,
    memlong_integrations and the frameworks calling them (LangChain's ``add_documents`` calls the store's
    ``add_texts``); the outermost frame, if every one is skipped (the ``memlong`` command; in a worker thread, the
    thread's own start, e.g. ``concurrent/futures/thread.py`` for ``asyncio.to_thread``).

    Example:
        >>> warn("Namespace 'docs' outgrew memory_capacity=32768 tokens: ...", MemoryEvictionWarning)
    """
    skipped = _skipped()
    frame, level = sys._getframe(1), 2  # warn's caller is stack level 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
