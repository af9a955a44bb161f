"""memlong: memory-augmented retrieval for long-text modeling (MemLong) on any Llama-family HF model."""

from memlong.config import MemLongConfig
from memlong.embedder import Embedder
from memlong.memory import (
    Chunk,
    MemoryBank,
    MemoryEvictionWarning,
    MemoryFullError,
    MemoryMismatchError,
    SearchHit,
    UnknownChunkError,
)
from memlong.model import GenerationStats, IngestStats, MemLong
from memlong.storage import MemoryFileError

__all__ = ["Chunk", "Embedder", "GenerationStats", "IngestStats", "MemLong", "MemLongConfig", "MemoryBank",
           "MemoryEvictionWarning", "MemoryFileError", "MemoryFullError", "MemoryMismatchError", "SearchHit",
           "UnknownChunkError"]
__version__ = "0.1.0"
