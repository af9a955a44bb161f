"""`MemLongEmbedding`: the memory bank's own retriever embedder as a LlamaIndex ``BaseEmbedding``.

``VectorStoreIndex`` always embeds nodes with an embed model (``Settings.embed_model`` defaults to OpenAI).
Give it this one: it is the same offline model the bank indexes chunks with (all-MiniLM-L6-v2 by default),
so nothing is downloaded and query vectors live in the bank's space. (``MemLongVectorStore`` embeds queries
with the bank's embedder itself, so retrieval never depends on which embed model the index was given.)

Example:
    >>> embed_model = MemLongEmbedding.from_memlong(ml)
    >>> len(embed_model.get_query_embedding("Who guards the castle well?"))
    384
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import ConfigDict, PrivateAttr

from memlong import MemLong
from memlong.embedder import TextEmbedder, check_embedder

__all__ = ["MemLongEmbedding"]


class MemLongEmbedding(BaseEmbedding):
    """A memlong ``TextEmbedder`` (``MemLong.bank.embedder``) as a LlamaIndex embed model.

    Args:
        embedder: any object with ``dim`` and ``encode(list[str]) -> (N, dim)`` unit rows, or a ``MemLong``
            (its bank's embedder, as :meth:`from_memlong`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # a misspelt option is an error
    _embedder: TextEmbedder = PrivateAttr()

    def __init__(self, embedder: TextEmbedder | MemLong, **kwargs: Any) -> None:
        if isinstance(embedder, MemLong):  # the natural first try: its bank's embedder is meant
            embedder = embedder.bank.embedder
        try:
            embedder = check_embedder(embedder)
        except TypeError:
            raise TypeError(f"MemLongEmbedding needs a memlong TextEmbedder (ml.bank.embedder) or a MemLong, got "
                            f"{type(embedder).__name__}; MemLongEmbedding.from_memlong(ml) is the usual way.") from None
        kwargs.setdefault("model_name", str(getattr(embedder, "name", type(embedder).__name__)))
        super().__init__(**kwargs)
        self._embedder = embedder

    @classmethod
    def from_memlong(cls, memlong: MemLong, **kwargs: Any) -> MemLongEmbedding:
        """The embedder of ``memlong.bank`` (the one its chunks are indexed with)."""
        return cls(memlong.bank.embedder, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "MemLongEmbedding"

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embedder.encode(list(texts)).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._get_text_embeddings([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)
