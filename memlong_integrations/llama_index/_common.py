"""Shared pieces of the LlamaIndex adapters: metadata keys, chunk -> node conversion, offline tiktoken.

Every node that leaves the memory bank is one bank chunk: its ``id_`` *is* the chunk id, and its metadata
carries ``memlong_chunk_id`` / ``memlong_namespace`` (plus the LlamaIndex node and document it came from),
all hidden from the LLM and embedding text, so a stock text pipeline shows the model only the chunk text
and the K-V pipeline can read the ids back.
"""

from __future__ import annotations

import os
from typing import Any

from llama_index.core.schema import NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode

from memlong import MemoryBank
from memlong_integrations.metadata import CHUNK_ID_KEY, NAMESPACE_KEY, chunk_id_of

NODE_ID_KEY = "memlong_node_id"  # the LlamaIndex node that was ingested into this chunk
REF_DOC_ID_KEY = "memlong_ref_doc_id"  # the LlamaIndex document of that node
EXCLUDED_KEY = "memlong_excluded_keys"  # the ingested node's own excluded metadata keys {"llm": [...], "embed": [...]}
INTERNAL_KEYS = (CHUNK_ID_KEY, NAMESPACE_KEY, NODE_ID_KEY, REF_DOC_ID_KEY, EXCLUDED_KEY)


def user_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata a user gave the node (without memlong's bookkeeping keys)."""
    return {k: v for k, v in metadata.items() if k not in INTERNAL_KEYS}


def chunk_node(bank: MemoryBank, chunk_id: str, namespace: str, score: float | None = None) -> NodeWithScore:
    """A ``NodeWithScore`` for one bank chunk: id = chunk id, text = chunk text, chunk id in hidden metadata.

    Raises:
        memlong.UnknownChunkError: the chunk is not in ``namespace``.
    """
    chunk = bank.get(chunk_id, namespace=namespace)
    meta = dict(chunk.metadata)
    excluded = meta.get(EXCLUDED_KEY) or {}
    hidden = list(INTERNAL_KEYS)
    metadata = {**user_metadata(meta), CHUNK_ID_KEY: chunk.id, NAMESPACE_KEY: namespace,
                NODE_ID_KEY: meta.get(NODE_ID_KEY), REF_DOC_ID_KEY: meta.get(REF_DOC_ID_KEY, chunk.doc_id)}
    node = TextNode(id_=chunk.id, text=chunk.text, metadata=metadata,
                    excluded_llm_metadata_keys=[*excluded.get("llm", []), *hidden],
                    excluded_embed_metadata_keys=[*excluded.get("embed", []), *hidden],
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=str(metadata[REF_DOC_ID_KEY]))})
    return NodeWithScore(node=node, score=score)


def chunk_ids_of(nodes: list[NodeWithScore], *, namespace: str | None = None) -> list[str]:
    """The chunk ids carried by retrieved nodes (in the order given).

    Raises:
        ValueError: a node that did not come from the memory bank (no ``memlong_chunk_id``).
        memlong.UnknownChunkError: a node from another namespace than ``namespace``.
    """
    ids = []
    for item in nodes:
        cid = chunk_id_of(item.node.metadata, namespace=namespace)
        if not cid:
            raise ValueError(f"Node {item.node.node_id!r} carries no {CHUNK_ID_KEY!r} in its metadata, so it has no K-V "
                             "in the memory bank. Retrieve with MemLongRetriever or a VectorStoreIndex over "
                             "MemLongVectorStore, or use LlamaIndex's text synthesizer for other retrievers.")
        ids.append(str(cid))
    return list(dict.fromkeys(ids))


def checked_memlong(owner: str, memlong: Any) -> Any:
    """``memlong`` after checking it is a :class:`memlong.MemLong` (``TypeError`` saying how to get one), with
    LlamaIndex's tiktoken counting made offline: what every adapter's ``__init__`` needs first. (Importing the
    package changes nothing global; the offline tokenizer is set up here, when the first adapter is built.)"""
    from memlong import MemLong

    if not isinstance(memlong, MemLong):
        raise TypeError(f"{owner} needs a memlong.MemLong model, got {type(memlong).__name__}. "
                        "Load one with MemLong.from_pretrained(...).")
    ensure_offline_tiktoken()
    return memlong


def ensure_offline_tiktoken() -> None:
    """Make LlamaIndex's token counting (``llama_index.core.utils.get_tokenizer``) work without a network.

    LlamaIndex counts tokens with tiktoken's ``cl100k_base``, which tiktoken downloads unless it finds it
    in ``TIKTOKEN_CACHE_DIR``. llama-index-core ships that file; it only looks there when the variable is
    unset. This loads the shipped encoding whatever the variable says (restoring it afterwards) and
    installs it as LlamaIndex's global tokenizer, unless the user already set one.
    """
    import llama_index.core
    from llama_index.core.utils import set_global_tokenizer

    if llama_index.core.global_tokenizer is not None:
        return
    from functools import partial

    import tiktoken

    shipped = os.path.join(os.path.dirname(os.path.abspath(llama_index.core.__file__)), "_static", "tiktoken_cache")
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = shipped
    try:
        encoding = tiktoken.get_encoding("cl100k_base")
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
    set_global_tokenizer(partial(encoding.encode, allowed_special="all"))
