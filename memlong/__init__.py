"""memlong: memory-augmented retrieval for long-text modeling (MemLong) on any Llama-family HF model.

The public names are imported on first use (``from memlong import MemLong`` works as usual), so that the
``memlong`` command answers ``--help`` and flag errors without importing torch first.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memlong.config import MemLongConfig
    from memlong.embedder import Embedder
    from memlong.generation import Generation, PromptTooLongError
    from memlong.memory import (
        Chunk,
        MemoryBank,
        MemoryEvictionWarning,
        MemoryFullError,
        MemoryMismatchError,
        SearchHit,
        UnknownChunkError,
    )
    from memlong.model import GenerationStats, IngestStats, MemLong, RunOutput
    from memlong.storage import MemoryFileError
    from memlong.streaming import Stream

# public name -> the module that defines it
_WHERE = {"MemLongConfig": "config", "Embedder": "embedder", "Generation": "generation",
          "PromptTooLongError": "generation", "Chunk": "memory", "MemoryBank": "memory",
          "MemoryEvictionWarning": "memory", "MemoryFullError": "memory", "MemoryMismatchError": "memory",
          "SearchHit": "memory", "UnknownChunkError": "memory", "GenerationStats": "model", "IngestStats": "model",
          "MemLong": "model", "RunOutput": "model", "MemoryFileError": "storage", "Stream": "streaming"}

__all__ = ["Chunk", "Embedder", "Generation", "GenerationStats", "IngestStats", "MemLong", "MemLongConfig", "MemoryBank",
           "MemoryEvictionWarning", "MemoryFileError", "MemoryFullError", "MemoryMismatchError", "PromptTooLongError",
           "RunOutput", "SearchHit", "Stream", "UnknownChunkError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:  # a submodule (``import memlong; memlong.memory``), as when the package imported them all
        if not name.startswith("_") and importlib.util.find_spec(f"memlong.{name}") is not None:
            return importlib.import_module(f"memlong.{name}")
        raise AttributeError(f"module 'memlong' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"memlong.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
