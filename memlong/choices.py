"""The closed sets of names that options take, in a module that imports neither torch nor faiss.

The core modules re-export them where they are used (``memlong.search.SEARCH_MODES``,
``memlong.icl_memory.STORAGES``, ...); the CLI reads them from here, so ``memlong --help`` and a mistyped flag
answer before torch is imported (about 3 s on a laptop CPU).

Example:
    >>> "hybrid" in SEARCH_MODES, ICL_DEFAULTS["storage"] in STORAGES
    (True, True)
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = ["ASK_LAYOUTS", "ICL_DEFAULTS", "MEMORY_DTYPES", "PACKAGED_ADAPTERS", "RETRIEVALS", "SEARCH_MODES", "STORAGES",
           "MemoryDtype", "SearchMode"]

SearchMode = Literal["dense", "lexical", "hybrid"]
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)
MemoryDtype = Literal["bfloat16", "float16", "float32"]
MEMORY_DTYPES: tuple[str, ...] = get_args(MemoryDtype)
# How the ICL benchmark stores memory demonstrations and picks them per test sentence (memlong.icl_memory).
STORAGES = ("demo", "aligned", "stream")
RETRIEVALS = ("similar", "balanced")
# The memory setting icl_eval uses unless told otherwise (chosen by benchmarks/icl.py, docs/icl.md).
ICL_DEFAULTS: dict[str, Any] = {"storage": "demo", "retrieval": "similar", "memory_k": 24}
# How `memlong ask` puts a question (memlong.ask.prompt_for); the first is the default (benchmarks/ask_layouts.py).
ASK_LAYOUTS = ("role", "chat", "plain")
# Adapters shipped inside the package (``adapter="<name>"``); only adapters that measured better than the
# training-free mode ship (README, "Fine-tuning the upper layers").
PACKAGED_ADAPTERS: dict[str, str] = {"shakespeare": "smollm2-135m-shakespeare"}
