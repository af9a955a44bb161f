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


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` with the stack level of the first frame outside memlong and
    memlong_integrations (the outermost frame, if every one is ours: the ``memlong`` command).

    Example:
        >>> warn("Namespace 'docs' outgrew memory_capacity=32768 tokens: ...", MemoryEvictionWarning)
    """
    frame, level = sys._getframe(1), 2  # warn's caller is stack level 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OURS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
