"""memlong: memory-augmented retrieval for long-text modeling (MemLong) on any Llama-family HF model."""

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

__all__ = ["Chunk", "Embedder", "Generation", "GenerationStats", "IngestStats", "MemLong", "MemLongConfig", "MemoryBank",
           "MemoryEvictionWarning", "MemoryFileError", "MemoryFullError", "MemoryMismatchError", "PromptTooLongError",
           "RunOutput", "SearchHit", "Stream", "UnknownChunkError"]
__version__ = "0.1.0"
