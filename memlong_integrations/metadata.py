"""The metadata keys memlong puts on retrieved chunks, one set for both frameworks.

A retrieved chunk (a LangChain ``Document`` or a LlamaIndex node) carries in its metadata:

* ``memlong_chunk_id`` (:data:`CHUNK_ID_KEY`): the bank chunk id, what the model attends to as K-V;
* ``memlong_namespace`` (:data:`NAMESPACE_KEY`): the bank namespace the chunk lives in;
* LangChain: ``memlong_doc_id`` (:data:`DOC_ID_KEY`), the bank document (vector-store entry) the chunk belongs to,
  and ``memlong_score`` (:data:`SCORE_KEY`), the retrieval score;
* LlamaIndex: ``memlong_node_id`` and ``memlong_ref_doc_id``, the node ingested into the chunk and its document (the
  score is ``NodeWithScore.score``).

:func:`chunk_id_of` is the one check that a retrieved item can be read as K-V.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlong import UnknownChunkError

__all__ = ["CHUNK_ID_KEY", "DOC_ID_KEY", "NAMESPACE_KEY", "SCORE_KEY", "chunk_id_of"]

CHUNK_ID_KEY = "memlong_chunk_id"
NAMESPACE_KEY = "memlong_namespace"
DOC_ID_KEY = "memlong_doc_id"
SCORE_KEY = "memlong_score"


def chunk_id_of(metadata: Mapping[str, Any], *, namespace: str | None = None) -> str | None:
    """The chunk id in a retrieved item's ``metadata`` (``None`` if it has none).

    Raises:
        memlong.UnknownChunkError: the item says it comes from another namespace than ``namespace``.
    """
    cid = metadata.get(CHUNK_ID_KEY)
    if not cid:
        return None
    space = metadata.get(NAMESPACE_KEY)
    if namespace is not None and space is not None and space != namespace:
        raise UnknownChunkError(f"Chunk {cid!r} comes from memory namespace {space!r}, but the model reads namespace "
                                f"{namespace!r}. Give the retriever and the model the same namespace.")
    return str(cid)
