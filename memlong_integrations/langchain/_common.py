"""Pieces shared by the LangChain adapters: Documents -> chunk ids, clear refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Literal, NoReturn

from langchain_core.documents import Document

from memlong import MemoryBank, UnknownChunkError
from memlong_integrations.metadata import CHUNK_ID_KEY, chunk_id_of

__all__ = ["REMOTE_OPTIONS", "chunk_id_list", "drop_remote_options", "memlong_chunk_ids_from_documents",
           "not_supported", "stepped"]

REMOTE_OPTIONS = ("timeout", "max_retries", "api_key", "base_url")  # LangChain standard options, no meaning locally


def drop_remote_options(values: Any) -> Any:
    """A model's constructor arguments without LangChain's remote-only standard options (accepted, no effect), so
    that ``extra="forbid"`` refuses only real unknowns (typos)."""
    return {k: v for k, v in values.items() if k not in REMOTE_OPTIONS} if isinstance(values, dict) else values


def chunk_id_list(ids: Any) -> list[str] | None:
    """The ``memlong_chunk_ids`` call keyword as a list (None stays None); TypeError for one string (it would be
    read as one id per character) or non-string ids."""
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"memlong_chunk_ids must be a list of chunk id strings, got {type(ids).__name__} "
                        f"{str(ids)[:60]!r} (Document.metadata['memlong_chunk_id'], or "
                        "memlong_chunk_ids_from_documents(docs)).")
    ids = list(ids)
    if not all(isinstance(c, str) for c in ids):
        raise TypeError("memlong_chunk_ids must be a list of chunk id strings (Document.metadata"
                        "['memlong_chunk_id'] or memlong_chunk_ids_from_documents(docs)).")
    return ids


def not_supported(owner: str, feature: str, instead: str) -> NoReturn:
    """Raise ``NotImplementedError`` saying what ``owner`` cannot do and what to use instead."""
    raise NotImplementedError(f"{owner} does not support {feature}. {instead}")


def memlong_chunk_ids_from_documents(documents: Sequence[Document], *, bank: MemoryBank, namespace: str = "default",
                                     missing: Literal["raise", "skip"] = "raise") -> list[str]:
    """Chunk ids for ``documents``: a chunk Document (``metadata["memlong_chunk_id"]``, from
    :class:`MemLongRetriever`) gives its chunk; a :class:`MemLongVectorStore` entry (``Document.id``) gives all of
    its chunks. Bank order (document order), no duplicates. ``missing="skip"`` leaves out chunks and entries that
    are no longer stored (deleted by another thread since they were retrieved) instead of raising.

    Raises:
        memlong.UnknownChunkError: a chunk or entry that is not (or no longer) in ``namespace``.
        ValueError: a Document that carries neither a chunk id nor an id.
    """
    if missing not in ("raise", "skip"):
        raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}.")
    wanted = [doc.id for doc in documents if chunk_id_of(doc.metadata, namespace=namespace) is None and doc.id]
    entries = bank.doc_chunk_ids(namespace, doc_ids=wanted) if wanted else {}  # (not every entry of the namespace)
    ids: list[str] = []
    for doc in documents:
        cid = chunk_id_of(doc.metadata, namespace=namespace)
        if cid is not None:
            ids += bank.stored([cid], namespace=namespace) if missing == "skip" else [bank.get(cid, namespace=namespace).id]
        elif doc.id:
            if doc.id not in entries and missing == "skip":
                continue
            if doc.id not in entries:
                raise UnknownChunkError(
                    f"Document id {doc.id!r} has no chunks in namespace {namespace!r}: it was never added there, or "
                    "it was deleted or evicted. Retrieve from the MemLongVectorStore / MemLongRetriever of that namespace.")
            ids.extend(entries[doc.id])
        else:
            raise ValueError(f"A Document with neither metadata[{CHUNK_ID_KEY!r}] nor an id cannot be mapped to stored "
                             "K-V. Retrieve with MemLongRetriever or a MemLongVectorStore retriever.")
    with bank.reading():  # insertion order (document order) of the chunks asked for, not of the whole namespace
        kept = bank.stored(list(dict.fromkeys(ids)), namespace=namespace)
        order = {c: bank.get(c, namespace=namespace).order for c in kept}
    if missing == "skip":  # deleted since the checks above (another thread)
        ids = [c for c in ids if c in order]
    return sorted(dict.fromkeys(ids), key=lambda c: order.get(c, -1))  # one deleted meanwhile: memory_for names it


async def stepped(chunks: Iterator[Any], run_manager: Any) -> AsyncIterator[Any]:
    """The generation chunks of blocking iterator ``chunks``, each taken in a worker thread (the event loop stays
    free; a cancelled caller stops decoding within a token), their text reported to ``run_manager``'s token
    callback (an async callback manager, or ``None``)."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, chunks, done)
        if chunk is done:
            break
        if run_manager is not None and chunk.text:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk
