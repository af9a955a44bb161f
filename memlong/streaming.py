"""Streaming a document through the model window by window: :class:`Stream`, ``ingest`` and ``perplexity``.

A :class:`Stream` is one document on its way into memory. Each :meth:`Stream.step` (``Stream.step_size`` tokens:
``config.step`` unless given; ``ingest`` gives ``config.store_step``)

1. retrieves ``k`` chunks (default ``ingest_top_k``; default 0: none) with the *previous* chunk as the query
   (never the step's own tokens), skipping chunks still in the local cache;
2. runs the step over ``[retrieved K-V | sink | local cache | step]``;
3. writes the step's chunks to the bank (pre-RoPE K-V of the source layers, computed with their real
   preceding context), after use;
4. keeps only the last ``local_window - step_size`` tokens in the local cache.

Memory is bounded by the bank's capacity, compute per step by the local window. ``ingest`` (below) streams
whole documents; ``perplexity`` scores a document's tail; training (:mod:`memlong.train`) streams segments and
back-propagates through the step's logits.

Example:
    >>> stream = ml.stream("doc", doc_id="hamlet")
    >>> for s in range(0, len(tokens), ml.config.step):
    ...     logits = stream.step(tokens[s:s + ml.config.step], logits=True)   # (1, T, V)
    >>> stream.flush()
    >>> stream.chunk_ids[:2]
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import math
import numbers
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from memlong.bank_writes import is_staging
from memlong.positions import Stacked
from memlong.records import as_list, check_count, check_metadata, check_namespace, check_string, check_text
from memlong.texts import CONTEXT as _CONTEXT
from memlong.texts import chunk_texts
from memlong.user_warning import warn

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["IngestStats", "Stream", "ingest", "perplexity"]

# Ingest without retrieval embeds chunks in batches of about this many tokens (one embedder call per batch
# instead of per step; the pending K-V stay on the model's device until then). The bank is still written step by
# step, so eviction and byte limits see exactly the writes an unbatched ingest makes.
_WRITE_BATCH_TOKENS = 4096

# one chunk on its way to the bank: (text, keys (L_src, Hkv, T, D), values, document span, token ids)
_NewChunk = tuple[str, torch.Tensor, torch.Tensor, tuple[int, int], Sequence[int]]


@dataclass
class IngestStats:
    """What one ``ingest`` call did."""

    documents: int = 0
    tokens: int = 0
    chunks: int = 0
    chunk_ids: list[str] = field(default_factory=list)  # the chunks it wrote that are still stored
    seconds: float = 0.0
    evicted: int = 0  # chunks it wrote and evicted again (a document over memory_capacity loses its first chunks)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Stream:
    """Streaming state of one document: the bounded local cache and what is inside it.

    Args:
        ml: the model.
        namespace: the memory namespace to read and write.
        doc_id: the document's id in the bank (default: a fresh one).
        metadata: copied onto every chunk of the document.
        isolated: no cache carried between steps (``ingest(context="chunk")``: each step is one chunk).
        store: write the steps' chunks to the bank (``False``: a local-window-only pass, nothing stored).
        batch_writes: embed chunks of steps that retrieve nothing in batches (written by the next full batch or
            :meth:`flush`); only for streams whose steps never retrieve, so that nothing can miss a pending chunk.
        step_size: tokens per step (default ``config.step``); the cache keeps ``local_window - step_size`` tokens.

    Attributes:
        offset: document tokens consumed so far.
        cache_len: tokens in the local cache.
        chunk_ids: every chunk this stream stored.
    """

    def __init__(self, ml: MemLong, namespace: str, *, doc_id: str | None = None,
                 metadata: dict[str, Any] | None = None, isolated: bool = False, store: bool = True,
                 batch_writes: bool = False, step_size: int | None = None) -> None:
        self.ml = ml
        self.step_size = ml.config.step if step_size is None else step_size
        if not 0 < self.step_size <= ml.config.local_window:
            raise ValueError(f"step_size ({self.step_size}) must be in 1..local_window ({ml.config.local_window}).")
        self.namespace = check_namespace(namespace)  # checked now, not when the first step writes
        self.doc_id = check_text(doc_id, "doc_id", empty=True) if doc_id is not None else f"doc-{secrets.token_hex(8)}"
        self.metadata = check_metadata(metadata or {})
        self.isolated = isolated
        self.store = store
        self.cache: Stacked | None = None  # pre-RoPE (keys, values) of every layer, (L, Hkv, C, D) each
        self.cache_len = 0
        self.offset = 0
        self.chunk_ids: list[str] = []
        self.recent: list[tuple[str, int]] = []  # (chunk id, end offset) of stored chunks
        self.last_query: str | np.ndarray | None = None  # the previous step's last chunk (text, or its embedding)
        self.tail: list[int] = []  # the previous step's last tokens: where this step's first characters began
        self.pending: list[list[_NewChunk]] | None = [] if batch_writes else None

    def step(self, tokens: Sequence[int], *, k: int | None = None, logits: bool = False,
             span: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Process one step: retrieve ``k`` chunks (``ingest_top_k``; isolated: 0), run, write its chunks, slide the cache.

        Args:
            tokens: the step's token ids (at most ``step_size``).
            k: chunks to retrieve for this step (0: none).
            logits: return the step's logits ``(1, T, V)`` (float32; differentiable outside ``no_grad``).
            span: the document span of a step whose tokens are not the document's own (a stripped chunk); the
                step is then written as one chunk and the stream advances to the span's end.
        """
        ml, cfg = self.ml, self.ml.config
        if span is None and len(tokens) > self.step_size:  # the cache keeps window - step_size: more overflows it
            raise ValueError(f"A step of {len(tokens)} tokens is longer than this stream's step_size "
                             f"({self.step_size}); split it, or open the stream with a larger step_size.")
        k = (0 if self.isolated else cfg.ingest_k) if k is None else check_count(k, "k")  # isolated: the chunk alone
        if k > 0 and self.pending:  # batched chunks first: retrievable now, and stored in document order
            self.flush()
        with ml.bank.reading():  # what the search finds is still there when it is read (another thread may delete)
            memory = ml.memory_for(self._retrieve(k), self.namespace)
        ctx, start = ml.context(memory, self.cache, capture=True)
        # compiled: full steps that read no memory (one shape per stream once its cache is full), without gradients
        ctx.compiled = cfg.stream_compile and memory is None and len(tokens) == self.step_size and \
            not torch.is_grad_enabled()
        if start + len(tokens) > ml.max_positions:
            raise ValueError(f"A step needs positions up to {start + len(tokens)} but the model has "
                             f"{ml.max_positions}; lower local_window (or ingest_top_k / chunk_size when chunks "
                             "are read while ingesting).")
        out = ml.run(tokens, positions=torch.arange(len(tokens)) + start, context=ctx,
                     logits_for=slice(None) if logits else None)
        new = self._new_chunks(tokens, ctx.stacked, span)
        if self.store:
            self._store(new, k)
        self._slide(ctx.stacked)
        self.offset = span[1] if span else self.offset + len(tokens)
        return out.logits

    def flush(self) -> None:
        """Write chunks still waiting to be embedded (``batch_writes``)."""
        if self.pending:
            self._write(self.pending)
        self.pending = [] if self.pending is not None else None

    # ------------------------------------------------------------------ the step's parts
    def _retrieve(self, k: int) -> list[str]:
        if k <= 0 or self.last_query is None:
            return []
        in_cache = [cid for cid, end in self.recent if end > self.offset - self.cache_len]
        hits = self.ml.bank.search(self.last_query, namespace=self.namespace, k=k, exclude=in_cache, mode="dense")
        return [h.chunk_id for h in hits]

    def _new_chunks(self, tokens: Sequence[int], captured: Stacked, span: tuple[int, int] | None) -> list[_NewChunk]:
        """The step's chunks with their K-V; sets ``last_query`` to the step's last chunk's text.

        The source layers' K-V of the whole step are copied to the bank's device and dtype at once (one transfer
        per step from a GPU, not one per chunk and layer); each chunk is a slice of them (the bank copies it)."""
        ml = self.ml
        size = len(tokens) if span else ml.config.chunk_size  # a step given its span is one chunk
        bounds = [(s, min(s + size, len(tokens))) for s in range(0, len(tokens), size)]
        texts = [ml.tokenizer.decode(tokens)] if span else chunk_texts(ml.tokenizer, self.tail, tokens, bounds)
        self.tail, self.last_query = ([] if span else [*self.tail, *tokens][-_CONTEXT:]), texts[-1]
        if not self.store:
            return []
        srcs = list(ml.config.source_layers)
        keys, values = captured
        if srcs != list(range(keys.shape[0])):
            at = torch.tensor(srcs, device=keys.device)
            keys, values = keys.index_select(0, at), values.index_select(0, at)
        bank = ml.bank
        keys, values = keys.detach().to(bank.device, bank.dtype), values.detach().to(bank.device, bank.dtype)
        new = []
        for (s, e), text in zip(bounds, texts):
            if not text.strip():
                continue  # whitespace-only chunk: nothing to retrieve it by
            new.append((text, keys.narrow(2, s, e - s), values.narrow(2, s, e - s),
                        span or (self.offset + s, self.offset + e), tokens[s:e]))
        return new

    def _store(self, new: list[_NewChunk], k: int) -> None:
        if self.pending is not None and k == 0:
            self.pending.append(new)
            if sum(c[3][1] - c[3][0] for step in self.pending for c in step) >= _WRITE_BATCH_TOKENS:
                self.flush()
            return
        embeddings = self._write([new])
        if new and new[-1][0] == self.last_query:  # the next step's query was just embedded: reuse it
            self.last_query = np.asarray(embeddings[-1:], dtype=np.float32)

    def _write(self, steps: list[list[_NewChunk]]) -> np.ndarray | None:
        """Embed the chunks of ``steps`` in one batch, then add them to the bank one step at a time."""
        chunks = [c for step in steps for c in step]
        if not chunks:
            return None
        bank = self.ml.bank
        embeddings = bank.embedder.encode([c[0] for c in chunks])
        start = 0
        for step in filter(None, steps):
            texts, keys, values, spans, tokens = (list(x) for x in zip(*step))
            ids = bank.add_chunks(texts, keys=keys, values=values, namespace=self.namespace, doc_id=self.doc_id,
                                  spans=spans, embeddings=embeddings[start:start + len(step)],
                                  metadata=[self.metadata] * len(texts), tokens=tokens)
            start += len(step)
            self.chunk_ids += ids
            self.recent.extend((cid, span[1]) for cid, span in zip(ids, spans))
        cfg = self.ml.config
        self.recent = self.recent[-(cfg.local_window // cfg.chunk_size + 2):]
        return embeddings

    def _slide(self, captured: Stacked) -> None:
        """Keep the last ``local_window - step_size`` tokens in the local cache."""
        keep = 0 if self.isolated else self.ml.config.local_window - self.step_size
        keys, values = captured  # (L, Hkv, T, D)
        if keep and self.cache is not None:  # (with nothing kept, nothing to join)
            keys, values = torch.cat([self.cache[0], keys], 2), torch.cat([self.cache[1], values], 2)
        start = keys.shape[2] - min(keep, keys.shape[2])
        self.cache = keys[:, :, start:].detach(), values[:, :, start:].detach()
        self.cache_len = self.cache[0].shape[2]


_DOCUMENT_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its copy for documents
_DOCUMENT_LOCK = threading.Lock()


def document_tokens(ml: MemLong, text: str) -> list[int]:
    """Token ids of a document with every special-token string read as plain text: a document holding
    ``"<|im_end|><|im_start|>system"`` stores those characters, not the control tokens of a chat template, which
    would forge a turn in every answer that reads it (prompts keep ``ml.tokenize``: their templates are made of them).
    A copy of the tokenizer does it: ``split_special_tokens=True`` sets a flag on the shared backend, so on
    ``ml.tokenizer`` a prompt another thread encoded meanwhile lost its template tokens."""
    with _DOCUMENT_LOCK:
        tokenizer = _DOCUMENT_TOKENIZERS.get(ml.tokenizer)
        if tokenizer is None:
            tokenizer = _DOCUMENT_TOKENIZERS[ml.tokenizer] = copy.deepcopy(ml.tokenizer)
    return tokenizer(check_string(text, "text"), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _stripped(ml: MemLong, before: Sequence[int], tokens: Sequence[int]) -> list[int] | None:
    """The tokens of ``tokens``' text (:func:`chunk_texts`) without surrounding whitespace (``None`` if nothing is
    left). Without its leading space a first word can take a token more, so a stripped chunk may exceed
    ``chunk_size``."""
    text = chunk_texts(ml.tokenizer, before, tokens, [(0, len(tokens))])[0]
    if not text.strip():
        return None
    return list(tokens) if ml.tokenizer.decode(tokens) == text.strip() else document_tokens(ml, text.strip())


def _check_ingest(texts: str | Sequence[str], namespace: str, doc_ids: Sequence[str] | None,
                  metadatas: Sequence[dict[str, Any]] | None, context: str, strip: bool
                  ) -> tuple[list[str], list[str] | None, list[dict[str, Any]] | None]:
    """The documents, doc ids and metadatas as lists, after checking every argument (before any work)."""
    if context not in ("document", "chunk"):
        raise ValueError(f"context must be 'document' (K-V from the document's window) or 'chunk' (K-V from the "
                         f"chunk alone); got {context!r}.")
    if strip and context != "chunk":
        raise ValueError("strip=True re-tokenizes each chunk on its own, which needs context='chunk' (in a "
                         "document's window the chunk's tokens are the document's).")
    if texts is None or isinstance(texts, (bytes, bytearray, numbers.Number)):
        check_string(texts, "texts (one document, or a list of them)")
    docs = [texts] if isinstance(texts, str) else as_list(texts, "texts")
    doc_ids = None if doc_ids is None else as_list(doc_ids, "doc_ids")
    metadatas = None if metadatas is None else as_list(metadatas, "metadatas")
    if doc_ids is not None and len(doc_ids) != len(docs):
        raise ValueError(f"Got {len(docs)} documents but {len(doc_ids)} doc_ids.")
    odd = next((i for i, d in enumerate(doc_ids or ()) if not isinstance(d, str)), None)
    if odd is not None:  # the bank refuses it too, but only after the whole forward
        raise ValueError(f"doc_ids[{odd}] must be a string, got {type(doc_ids[odd]).__name__} {doc_ids[odd]!r}; "
                         "leave doc_ids out for random ids. Nothing was ingested.")
    twice = [d for d, n in Counter(d for d in doc_ids or () if isinstance(d, str)).items() if n > 1]
    if twice and not is_staging(namespace):  # upsert.ingest_replacing stages nodes that share their document's id
        raise ValueError(f"doc_ids name {twice[0]!r} twice; each document needs its own id (they would be merged into "
                         "one document: deleted, grouped and read as one). Nothing was ingested.")
    if metadatas is not None and len(metadatas) != len(docs):
        raise ValueError(f"Got {len(docs)} documents but {len(metadatas)} metadatas.")
    for i, doc in enumerate(docs):
        check_string(doc, f"Document {i}")
        if not doc.strip():
            raise ValueError(f"Document {i} is empty: there is nothing to ingest. Pass non-empty text.")
    check_namespace(namespace)  # before any work, as the metadata: the bank would refuse them after the forward
    for i, metadata in enumerate(metadatas or ()):
        check_metadata(metadata, f"metadatas[{i}]")
    return docs, doc_ids, metadatas

# Set by the framework adapters' async writes (memlong_integrations._threads.in_thread) to an Event that a
# cancelled await sets: the ingest running in the thread stops at its next step and rolls back.
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("memlong_cancel", default=None)


def check_cancelled() -> None:
    """Raise ``asyncio.CancelledError`` when the async call this thread runs for was cancelled (:data:`CANCEL`)."""
    if (cancel := CANCEL.get()) is not None and cancel.is_set():
        raise asyncio.CancelledError("The write was cancelled by its caller; nothing of it was kept.")


def _ingest_one(ml: MemLong, tokens: list[int], stream: Stream, size: int, strip: bool, bar: Any) -> None:
    for s in range(0, len(tokens), size):
        check_cancelled()
        step = tokens[s:s + size]
        stripped = _stripped(ml, tokens[max(0, s - _CONTEXT):s], step) if strip else step
        if stripped is None:  # whitespace only: nothing to store
            stream.offset = s + len(step)
        else:
            stream.step(stripped, span=(s, s + len(step)) if strip else None)
        bar.update(len(step))  # after the step: the bar counts tokens read, not started (its rate was ~2x early)
    stream.flush()


def ingest(ml: MemLong, texts: str | Sequence[str], *, namespace: str = "default",
           doc_ids: Sequence[str] | None = None, metadatas: Sequence[dict[str, Any]] | None = None,
           progress: bool = True, context: Literal["document", "chunk"] = "document",
           strip: bool = False) -> IngestStats:
    """Stream documents of any length into memory, window by window: the body of :meth:`memlong.MemLong.ingest`.

    Args:
        texts: one document or a list of documents (each streamed separately).
        namespace: the memory namespace to write to (one per document set, user or session).
        doc_ids: optional ids for the documents (used by ``MemoryBank.delete(doc_id=...)``).
        metadatas: optional per-document metadata dicts, copied onto each of the document's chunks
            (``MemoryBank.get(id).metadata``); adapters keep their node/document ids here.
        progress: show a tqdm progress bar over tokens.
        context: what each chunk's K-V are computed from. ``"document"`` (default, the paper's streaming): the
            chunk inside its document's sliding local window, best for reading a long document (perplexity,
            passkey). ``"chunk"``: the chunk alone (after the sink), which is what pasting that chunk at the start
            of a prompt would compute: best for RAG, where retrieved chunks are read out of their document
            (docs/rag-fidelity.md); one forward per chunk, so slower to ingest.
        strip: with ``context="chunk"``, store each chunk's text without its surrounding whitespace and compute
            its K-V from that text's tokens (the span stays the chunk's place in the document). LlamaIndex's
            synthesizers strip every chunk they paste, so its vector store does this, and the K-V then match
            what the stock text pipeline encodes (docs/integrations.md, "LlamaIndex").
    Returns:
        :class:`IngestStats`; its ``chunk_ids`` are the chunks still stored when the call returns (a document
        longer than ``memory_capacity`` evicts its own first chunks, with a ``MemoryEvictionWarning``).

    Raises:
        ValueError: a document that is empty or only whitespace; an unknown ``context``; ``strip`` without
            ``context="chunk"``. An ingest that raises (or is interrupted, or meets an eviction warning turned
            into an error) leaves none of its chunks in the bank; chunks that its earlier steps evicted to make
            room stay evicted (with warnings turned into errors, the first eviction raises, so there are none).

    Example:
        >>> stats = ingest(ml, open("hamlet.txt").read(), namespace="hamlet")   # = ml.ingest(...)
        >>> stats.chunks, stats.tokens_per_second
    """
    docs, doc_ids, metadatas = _check_ingest(texts, namespace, doc_ids, metadatas, context, strip)
    encoded = [document_tokens(ml, doc) for doc in docs]
    stats = IngestStats(documents=len(docs))
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(map(len, encoded)), unit="tok", disable=not progress,  # an adapter's staging space: unnamed
               desc="ingest" if is_staging(namespace) else f"ingest[{namespace}]")
    size = ml.config.chunk_size if context == "chunk" else ml.config.store_step
    stream: Stream | None = None
    try:
        with torch.no_grad():
            for i, tokens in enumerate(encoded):
                stream = Stream(ml, namespace, doc_id=doc_ids[i] if doc_ids else f"doc-{secrets.token_hex(8)}",
                                metadata=metadatas[i] if metadatas else None, isolated=context == "chunk",
                                batch_writes=ml.config.ingest_k == 0, step_size=size)  # nothing retrieved: batch
                _ingest_one(ml, tokens, stream, size, strip, bar)
                stats.tokens += len(tokens)
                stats.chunk_ids += stream.chunk_ids
                stream = None
        check_cancelled()  # cancelled while the last chunks were embedded: undone below, like any interrupt
    except BaseException:  # a failed or interrupted ingest leaves none of its chunks (no half documents)
        written = stats.chunk_ids + (stream.chunk_ids if stream is not None else [])
        try:
            ml.bank.delete(ml.bank.stored(written, namespace=namespace), namespace=namespace)
        except Exception:  # the undo must never hide why the ingest failed
            pass
        raise
    finally:
        bar.close()
    kept = ml.bank.stored(stats.chunk_ids, namespace=namespace)  # a document over capacity evicts its first chunks
    stats.chunks, stats.evicted, stats.chunk_ids = len(kept), len(stats.chunk_ids) - len(kept), kept
    stats.seconds = time.perf_counter() - t0
    return stats


def perplexity(ml: MemLong, text: str | Sequence[int], *, score_last: int = 2048, namespace: str | None = None,
               use_memory: bool = True, progress: bool = False) -> dict[str, float]:
    """Perplexity of the last ``score_last`` tokens, the rest streamed through memory: the body of
    :meth:`memlong.MemLong.perplexity`.

    ``use_memory=False`` gives the local-window baseline (same stream, nothing retrieved or stored). Uses (and
    afterwards resets) a scratch namespace unless ``namespace`` is given. Returns ``{"tokens", "scored_tokens",
    "ppl"}``.

    Raises:
        ValueError: fewer than 2 tokens, ``score_last`` not a positive integer, or an empty ``namespace``.
    """
    if isinstance(score_last, bool) or not isinstance(score_last, numbers.Integral) or score_last < 1:
        raise ValueError(f"score_last must be a positive number of tokens to score, got {score_last!r}.")
    tokens = ml.tokenize(text) if isinstance(text, str) else list(text)
    if len(tokens) < 2:
        raise ValueError("Perplexity needs at least 2 tokens of text.")
    if ml.reader is not None and use_memory:  # said, not silently the base model's score
        warn("The reader adapter is not used by perplexity: it reads retrieved memory only in answer-time forwards "
             "without a local cache (run, generate, score), and streaming always has one. This scores the base weights.")
    score_last = min(score_last, len(tokens) - 1)
    scratch = namespace is None
    ns = f"_ppl-{secrets.token_hex(8)}" if scratch else check_namespace(namespace)  # "": an error, not a scratch left
    stream = Stream(ml, ns, doc_id="ppl", store=use_memory)
    first_scored = len(tokens) - score_last  # target index of the first scored token
    nll, count = 0.0, 0
    cfg = ml.config
    from tqdm.auto import tqdm

    try:
        with torch.no_grad():
            for s in tqdm(range(0, len(tokens), cfg.step), disable=not progress, desc="ppl"):
                step = tokens[s:s + cfg.step]
                want = s + len(step) >= first_scored  # its last logit predicts token s + len(step)
                k = (cfg.top_k if want else cfg.ingest_k) if use_memory else 0
                logits = stream.step(step, logits=want, k=k)
                if not want:
                    continue
                targets = torch.as_tensor(tokens[s + 1:s + len(step) + 1], device=ml.device)
                lp = torch.log_softmax(logits[0, :len(targets)], -1).gather(1, targets[:, None])[:, 0]
                sel = torch.arange(s + 1, s + 1 + len(targets), device=ml.device) >= first_scored
                nll -= lp[sel].sum().item()
                count += int(sel.sum())
    finally:
        if scratch:
            ml.bank.reset(ns)
    return {"tokens": len(tokens), "scored_tokens": count, "ppl": math.exp(nll / max(count, 1))}
