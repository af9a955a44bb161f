"""`MemLong`: a pretrained Llama-family decoder + a `MemoryBank` + retrieval causal attention.

How a document flows through it (``ingest``): the token stream is cut into steps of
``config.step`` tokens. For each step we (1) retrieve ``ingest_top_k`` chunks (default 0: none) using the
*previous* chunk's text as the query (never the step's own tokens), skipping chunks still in the local
cache; (2) run the step with attention over ``[retrieved K-V | sink | local cache | step]``; (3) write the step's chunks
(their pre-RoPE K-V of the source layers, computed with their real preceding context) to the bank;
(4) keep only the last ``local_window - step`` tokens in the local cache. Memory is bounded by the bank's
capacity, compute per step by the local window.

``generate`` encodes only the prompt: retrieved chunks (by explicit id, or found with the prompt as
query) enter the retrieval layers as stored K-V (with ``kv_refresh``, a share of the retrieved tokens is
re-encoded next to the chunks retrieved with them first).

Example:
    >>> from memlong import MemLong
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> ml.ingest(open("hamlet.txt").read(), namespace="hamlet")
    >>> ml.generate("Who killed Polonius?", namespace="hamlet", max_new_tokens=20)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from memlong.attention import AttentionContext, Blend, register, rotate
from memlong.config import MemLongConfig
from memlong.embedder import Embedder, TextEmbedder
from memlong.memory import MemoryBank

__all__ = ["GenerationStats", "IngestStats", "MemLong", "SUPPORTED_ARCHITECTURES"]

# Decoders whose attention is q/k/v/o projections + standard RoPE + the transformers attention registry.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class IngestStats:
    """What one ``ingest`` call did."""

    documents: int = 0
    tokens: int = 0
    chunks: int = 0
    chunk_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class GenerationStats:
    """What the last ``generate`` call encoded and retrieved."""

    prompt_tokens: int = 0  # tokens the decoder encoded for the prompt (retrieved text: see refreshed_tokens)
    memory_tokens: int = 0  # tokens of retrieved K-V the retrieval layers attended to
    refreshed_tokens: int = 0  # retrieved tokens re-encoded (``kv_refresh``), on top of ``prompt_tokens``
    chunk_ids: list[str] = field(default_factory=list)
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    seconds: float = 0.0


# Ingest without retrieval embeds chunks in batches of about this many tokens (one embedder call per batch
# instead of per step; the pending K-V stay on the model's device until then). The bank is still written step by
# step, so eviction and byte limits see exactly the writes an unbatched ingest makes.
_WRITE_BATCH_TOKENS = 4096


@dataclass
class _Stream:
    """Streaming state of one document: the bounded local cache and what is inside it."""

    doc_id: str
    metadata: dict[str, Any] = field(default_factory=dict)  # copied onto every chunk of the document
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # pre-RoPE (1,Hkv,C,D)
    cache_len: int = 0
    recent: list[tuple[str, int]] = field(default_factory=list)  # (chunk id, end offset) of stored chunks
    last_query: str | np.ndarray | None = None  # the previous step's last chunk (text, or its stored embedding)
    offset: int = 0
    chunk_ids: list[str] = field(default_factory=list)  # every chunk this stream stored
    # steps whose chunks wait to be embedded in one batch and written (None: write every step at once). Only
    # for streams that never retrieve (ingest with ingest_top_k=0), so that nothing can miss a pending chunk.
    pending: list[list[tuple[str, torch.Tensor, torch.Tensor, tuple[int, int], Sequence[int]]]] | None = None
    isolated: bool = False  # context="chunk": no cache carried between steps (each step is one chunk)

    @property
    def pending_tokens(self) -> int:
        return sum(chunk[3][1] - chunk[3][0] for step in self.pending or () for chunk in step)


class MemLong:
    """A decoder with a chunk-level K-V memory (MemLong, Liu et al. 2024).

    Args:
        model: a transformers causal LM of a supported architecture (``SUPPORTED_ARCHITECTURES``).
        tokenizer: its tokenizer.
        config: a :class:`MemLongConfig` (layer defaults are resolved against the model depth).
        embedder: the retriever embedder (default: packaged all-MiniLM-L6-v2).
        bank: an existing :class:`MemoryBank` to share; a new one otherwise.
    """

    def __init__(self, model: Any, tokenizer: Any, config: MemLongConfig | None = None, *,
                 embedder: TextEmbedder | str | None = None, bank: MemoryBank | None = None) -> None:
        arch = getattr(model.config, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"Unsupported model architecture {arch!r}: MemLong supports {SUPPORTED_ARCHITECTURES} "
                             "(Llama-family decoders with standard RoPE attention). Pick a model of one of these types.")
        self.model = model
        self.tokenizer = tokenizer
        self.num_layers = int(model.config.num_hidden_layers)
        self.config = (config or MemLongConfig()).resolve(self.num_layers)
        register()
        model.config._attn_implementation = "memlong"
        model.eval()
        self.decoder = model.model  # embeddings + layers + final norm
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        if bank is None:
            emb = Embedder() if embedder in (None, "default") else (Embedder(embedder) if isinstance(embedder, str)
                                                                     else embedder)
            bank = MemoryBank(embedder=emb, capacity=self.config.memory_capacity,
                              evict_oldest=self.config.evict_oldest, keep_newest=self.config.keep_newest,
                              dtype=self.config.torch_memory_dtype, max_bytes=self.config.memory_max_bytes,
                              device=self.device if self.config.memory_device == "model" else "cpu",
                              pin_memory=self.config.memory_device == "pinned", search_mode=self.config.search_mode)
        self.bank = bank
        self.last_generation = GenerationStats()
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._sink_ids = [int(bos)] if (self.config.attention_sink and bos is not None) else []
        self._sink: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", *, embedder: TextEmbedder | str | None = None,
                        device: str | None = None, dtype: torch.dtype | str | None = None,
                        adapter: str | Path | None = None, **config: Any) -> MemLong:
        """Load ``"default"`` (embedded SmolLM2-135M-Instruct), any HF model id, or a local path.

        Extra keywords are :class:`MemLongConfig` fields, e.g. ``top_k=4, local_window=1024``.
        ``adapter``: a folder written by ``memlong train`` (:mod:`memlong.adapter`); its trained upper-layer
        weights are merged in and the config fields it was trained with (kv_source, position_layout, ...)
        become the defaults, which keywords still override.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(name_or_path)
        if path == "default":
            from memlong.default_model import default_model_path

            path = str(default_model_path())
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        if adapter is None:
            return cls(model, tokenizer, MemLongConfig(**config), embedder=embedder)
        from memlong.adapter import ADAPTER_CONFIG_FIELDS, load_adapter, read_adapter_config

        trained = read_adapter_config(adapter)["memlong_config"]
        trained = {k: tuple(v) if isinstance(v, list) else v for k, v in trained.items() if k in ADAPTER_CONFIG_FIELDS}
        ml = cls(model, tokenizer, MemLongConfig(**{**trained, **config}), embedder=embedder)
        load_adapter(model, adapter)
        ml._sink = None  # the sink's K-V depend on the weights just changed
        return ml

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ helpers
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``(1, T, D)`` of the model's own rotary embedding at ``positions``."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        return self.decoder.rotary_emb(probe, positions.view(1, -1).to(self.device))

    def _run(self, ids: Sequence[int] | torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
             logits_for: slice | None = slice(None)) -> torch.Tensor | None:
        """One forward of ``ids`` at ``positions`` under ``ctx``; logits of the selected positions."""
        ids = torch.as_tensor(ids, device=self.device).view(1, -1)
        positions = positions.view(1, -1).to(self.device)
        if ctx.capture:
            ctx.cos, ctx.sin = self._rope(positions)
        hidden = self.decoder(input_ids=ids, position_ids=positions, use_cache=False,
                              memlong_context=ctx).last_hidden_state
        return None if logits_for is None else self.model.lm_head(hidden[:, logits_for]).float()

    def _sink_kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Pre-RoPE K-V of the sink token per layer. A lone first token attends only to itself, so its
        K-V is the same in every window: computed once."""
        if self._sink is None:
            self._sink = {}
            if self._sink_ids:
                ctx = AttentionContext(capture=True, backend="eager")
                with torch.no_grad():
                    self._run(self._sink_ids, torch.zeros(1, dtype=torch.long), ctx, logits_for=None)
                self._sink = ctx.captured
        return self._sink

    def _backend(self) -> str:
        backend = self.config.attention_backend
        if backend == "auto":
            return "sdpa"  # flex measured 2x slower for ingest on an H100 (results/bench-gpu-h100-run1.json)
        return backend

    def _memory(self, chunk_ids: Sequence[str], namespace: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not chunk_ids:
            return None
        keys, values = self.bank.fetch(chunk_ids, namespace=namespace, device=self.device, dtype=self.dtype)
        expected = (len(self.config.source_layers), self._kv_heads(), self._head_dim())
        if (keys.shape[0], keys.shape[1], keys.shape[3]) != expected:
            raise ValueError(f"Stored K-V has shape (layers, heads, dim) = {(keys.shape[0], keys.shape[1], keys.shape[3])}"
                             f" but this model/config expects {expected}: the bank was filled by another model "
                             "or kv_source. Use a fresh namespace or the model that built it.")
        return keys, values

    def _kv_heads(self) -> int:
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.model.config.num_attention_heads)

    def _head_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def _context(self, memory: tuple[torch.Tensor, torch.Tensor] | None,
                 cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None, cache_len: int,
                 capture: bool = False, grow: bool = False) -> tuple[AttentionContext, int]:
        """Build the visible prefix ``[memory | sink | cache]`` for every layer, rotated to the layout.

        Returns the context and the position of the first new token.
        """
        cfg = self.config
        sink = self._sink_kv()
        base = 1 if sink else 0
        n_mem = 0 if memory is None else memory[0].shape[2]
        if cfg.position_layout == "continual":
            mem_start, cache_start = base, base + n_mem
        else:  # "zero": memory keys unrotated at 0, local tokens re-based from 1
            mem_start, cache_start = 0, 1
        ctx = AttentionContext(capture=capture, grow=grow, backend=self._backend())
        rope = {}
        if n_mem:
            zero = cfg.position_layout == "zero"
            rope["mem"] = self._rope(torch.zeros(n_mem, dtype=torch.long) if zero else torch.arange(n_mem) + mem_start)
        if sink:
            rope["sink"] = self._rope(torch.zeros(1, dtype=torch.long))
        if cache_len:
            rope["cache"] = self._rope(torch.arange(cache_len) + cache_start)
        retrieval = set(cfg.retrieval_layers)
        for layer in range(self.num_layers):
            ks, vs = [], []
            if n_mem and layer in retrieval:
                src = cfg.source_index(layer)
                ks.append(rotate(memory[0][src].unsqueeze(0), *rope["mem"]))
                vs.append(memory[1][src].unsqueeze(0))
            if sink:
                ks.append(rotate(sink[layer][0], *rope["sink"]).to(self.dtype))
                vs.append(sink[layer][1].to(self.dtype))
            if cache_len:
                ks.append(rotate(cache[layer][0], *rope["cache"]))
                vs.append(cache[layer][1])
            if ks:
                ctx.prefix[layer] = (torch.cat(ks, 2), torch.cat(vs, 2))
        return ctx, cache_start + cache_len

    def _chunk_tokens(self, chunk: Any) -> list[int] | None:
        """Token ids behind a chunk's K-V: the recorded ones, else its text re-tokenized when that gives as many
        tokens (banks saved before ids were recorded); ``None`` when neither is known."""
        if chunk.tokens is not None:
            ids = list(chunk.tokens)
        else:
            ids = self.tokenize(chunk.text)
            if len(ids) != chunk.n_tokens:
                return None
        vocab = self.model.get_input_embeddings().num_embeddings
        if any(t >= vocab for t in ids):
            raise ValueError(f"Chunk {chunk.id} holds token ids beyond this model's vocabulary ({vocab}): it was "
                             "stored by another model. Use the model that built the bank or a fresh namespace.")
        return ids

    def _refresh(self, memory: tuple[torch.Tensor, torch.Tensor], chunk_ids: Sequence[str], namespace: str,
                 share: float, probe_layer: int = 1) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """``kv_refresh``: re-encode the ``share`` of retrieved tokens whose stored K-V differ most from what they
        would be with the other retrieved chunks before them; returns the refreshed memory and the count.

        Stored chunk K-V never saw the chunks retrieved with them. Like CacheBlend (Yao et al., 2025), a probe
        runs all retrieved tokens through layers ``0..probe_layer`` in their retrieved order (a small share of
        a full encode), ranks tokens by how far their keys there lie from the stored ones, and runs the top
        ``share`` through every layer, each attending to the retrieved K-V before it (refreshed ones included).
        Their fresh K-V replace the stored ones for this answer only; the bank is not changed. ``share=1``
        computes exactly what encoding the retrieved tokens as text would.
        """
        keys, values = memory
        chunks = sorted((self.bank.get(c, namespace=namespace) for c in dict.fromkeys(chunk_ids)), key=lambda c: c.order)
        ids: list[int] = []
        known: list[bool] = []
        for c in chunks:
            toks = self._chunk_tokens(c)
            ids += toks if toks is not None else [0] * c.n_tokens
            known += [toks is not None] * c.n_tokens
        m = len(ids)
        known_t = torch.tensor(known, device=self.device)
        n = min(math.ceil(share * m), int(known_t.sum()))
        if n == 0:
            return memory, 0
        ids_t = torch.tensor(ids, device=self.device)
        if n < int(known_t.sum()):  # rank by the probe; with every known token refreshed, no ranking is needed
            ctx, pos = self._context(None, None, 0, capture=True)
            hook = self.decoder.layers[probe_layer].register_forward_hook(_stop)
            try:
                self._run(ids_t, torch.arange(m) + pos, ctx, logits_for=None)
            except _Stop:
                pass
            finally:
                hook.remove()
            fresh = ctx.captured[probe_layer][0][0].float()
            stale = keys[self.config.source_index(probe_layer)].to(fresh.device).float()
            deviation = (fresh - stale).norm(dim=-1).sum(0).masked_fill(~known_t, float("-inf"))
            slots = deviation.topk(n).indices.sort().values
        else:
            slots = known_t.nonzero().view(-1)
        ctx, pos = self._context(memory, None, 0, capture=True)
        # each layer's prefix is [memory (positions pos-m .. pos-1) | sink (position 0)]
        key_pos = torch.arange(m, device=self.device) + pos - m
        if self._sink_ids:
            key_pos = torch.cat([key_pos, torch.zeros(1, dtype=torch.long, device=self.device)])
        query_pos = key_pos[slots]
        ctx.blend = Blend(slots=slots, visible=key_pos[None, :] <= query_pos[:, None])
        self._run(ids_t[slots], query_pos, ctx, logits_for=None)
        keys, values = keys.clone(), values.clone()
        for i, layer in enumerate(self.config.source_layers):
            keys[i][:, slots] = ctx.captured[layer][0][0].to(keys.dtype)
            values[i][:, slots] = ctx.captured[layer][1][0].to(values.dtype)
        return (keys, values), n

    # ------------------------------------------------------------------ streaming
    def _retrieve_for_stream(self, state: _Stream, namespace: str, k: int) -> list[str]:
        if k <= 0 or state.last_query is None:
            return []
        in_cache = [cid for cid, end in state.recent if end > state.offset - state.cache_len]
        hits = self.bank.search(state.last_query, namespace=namespace, k=k, exclude=in_cache, mode="dense")
        return [h.chunk_id for h in hits]

    def _stream_step(self, tokens: Sequence[int], state: _Stream, namespace: str, *, write: bool = True,
                     logits: bool = False, retrieve: bool = True, k: int | None = None,
                     span: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Process one step of a document: retrieve ``k`` chunks (default ``ingest_top_k``), run, write its
        chunks, slide the cache. ``span``: the document span of a step whose tokens are not the document's own
        (a stripped chunk); the step is then written as one chunk and the stream advances to the span's end."""
        cfg = self.config
        k = cfg.ingest_k if k is None else k
        chunk_ids = self._retrieve_for_stream(state, namespace, k) if retrieve else []
        memory = self._memory(chunk_ids, namespace)
        ctx, start = self._context(memory, state.cache, state.cache_len, capture=True)
        positions = torch.arange(len(tokens)) + start
        if start + len(tokens) > self.max_positions:
            raise ValueError(f"A step needs positions up to {start + len(tokens)} but the model has "
                             f"{self.max_positions}; lower top_k, chunk_size or local_window.")
        out = self._run(tokens, positions, ctx, logits_for=slice(None) if logits else None)
        captured = ctx.captured
        # write the step's chunks, K-V from this pass (real preceding context), after use
        size = len(tokens) if span else cfg.chunk_size  # a step given its span is one chunk
        last_start = size * ((len(tokens) - 1) // size)
        state.last_query = self.tokenizer.decode(tokens[last_start:])
        if write:
            srcs = cfg.source_layers
            new = []
            for s in range(0, len(tokens), size):
                e = min(s + size, len(tokens))
                text = state.last_query if s == last_start else self.tokenizer.decode(tokens[s:e])
                if not text.strip():
                    continue  # whitespace-only chunk: nothing to retrieve it by
                new.append((text, torch.stack([captured[layer][0][0, :, s:e] for layer in srcs]),
                            torch.stack([captured[layer][1][0, :, s:e] for layer in srcs]),
                            span or (state.offset + s, state.offset + e), tokens[s:e]))
            if state.pending is not None and k == 0:
                state.pending.append(new)
                if state.pending_tokens >= _WRITE_BATCH_TOKENS:
                    self._write_chunks(state, namespace, state.pending)
                    state.pending = []
            else:
                embeddings = self._write_chunks(state, namespace, [new])
                if new and new[-1][0] == state.last_query:  # the next step's query was just embedded: reuse it
                    state.last_query = np.asarray(embeddings[-1:], dtype=np.float32)
        # slide the local cache: keep the last local_window - step tokens
        keep = 0 if state.isolated else cfg.local_window - cfg.step
        for layer in range(self.num_layers):
            k_new, v_new = captured[layer]
            if keep and layer in state.cache:  # (with nothing kept, nothing to join)
                k_new = torch.cat([state.cache[layer][0], k_new], 2)
                v_new = torch.cat([state.cache[layer][1], v_new], 2)
            state.cache[layer] = (k_new[:, :, -keep:].detach(), v_new[:, :, -keep:].detach()) if keep else \
                (k_new[:, :, :0].detach(), v_new[:, :, :0].detach())
        state.cache_len = state.cache[0][0].shape[2]
        state.offset = span[1] if span else state.offset + len(tokens)
        return out

    def _stripped(self, tokens: Sequence[int]) -> list[int] | None:
        """The tokens of ``tokens``' text without surrounding whitespace (``None`` if nothing is left). Without
        its leading space a first word can take a token more, so a stripped chunk may exceed ``chunk_size``."""
        text = self.tokenizer.decode(tokens)
        if not text.strip():
            return None
        return list(tokens) if text == text.strip() else self.tokenize(text.strip())

    def _write_chunks(self, state: _Stream, namespace: str, steps: list[list]) -> np.ndarray | None:
        """Embed the chunks (text, keys, values, span, tokens) of ``steps`` in one batch, then add them to the bank one
        step at a time. Returns the embeddings."""
        chunks = [c for step in steps for c in step]
        if not chunks:
            return None
        embeddings = self.bank.embedder.encode([c[0] for c in chunks])
        start = 0
        for step in filter(None, steps):
            texts, keys, values, spans, tokens = (list(x) for x in zip(*step))
            ids = self.bank.add_chunks(texts, keys=keys, values=values, namespace=namespace, doc_id=state.doc_id,
                                       spans=spans, embeddings=embeddings[start:start + len(step)],
                                       metadata=[state.metadata] * len(texts), tokens=tokens)
            start += len(step)
            state.chunk_ids += ids
            state.recent.extend((cid, span[1]) for cid, span in zip(ids, spans))
        state.recent = state.recent[-(self.config.local_window // self.config.chunk_size + 2):]
        return embeddings

    def ingest(self, texts: str | Sequence[str], *, namespace: str = "default", doc_ids: Sequence[str] | None = None,
               metadatas: Sequence[dict[str, Any]] | None = None, progress: bool = True,
               context: Literal["document", "chunk"] = "document", strip: bool = False) -> IngestStats:
        """Stream documents of any length into memory, window by window (see module docstring).

        Args:
            texts: one document or a list of documents (each streamed separately).
            namespace: the memory namespace to write to (one per document set, user or session).
            doc_ids: optional ids for the documents (used by ``MemoryBank.delete(doc_id=...)``).
            metadatas: optional per-document metadata dicts, copied onto each of the document's chunks
                (``MemoryBank.get(id).metadata``); adapters keep their node/document ids here.
            progress: show a tqdm progress bar over tokens.
            context: what each chunk's K-V are computed from. ``"document"`` (default, the paper's streaming):
                the chunk inside its document's sliding local window, best for reading a long document
                (perplexity, passkey). ``"chunk"``: the chunk alone (after the sink), which is what pasting that
                chunk at the start of a prompt would compute: best for RAG, where retrieved chunks are read
                out of their document (README, "RAG"); one forward per chunk, so slower to ingest.
            strip: with ``context="chunk"``, store each chunk's text without its surrounding whitespace and
                compute its K-V from that text's tokens (the span stays the chunk's place in the document).
                LlamaIndex's synthesizers strip every chunk they paste, so its vector store does this, and the
                K-V then match what the stock text pipeline encodes (README, "LlamaIndex").
        Raises:
            ValueError: a document that is empty or only whitespace; an unknown ``context``; ``strip`` without
                ``context="chunk"``.

        Example:
            >>> stats = ml.ingest(open("hamlet.txt").read(), namespace="hamlet")
            >>> stats.chunks, stats.tokens_per_second
        """
        if context not in ("document", "chunk"):
            raise ValueError(f"context must be 'document' (K-V from the document's window) or 'chunk' (K-V from the "
                             f"chunk alone); got {context!r}.")
        if strip and context != "chunk":
            raise ValueError("strip=True re-tokenizes each chunk on its own, which needs context='chunk' (in a "
                             "document's window the chunk's tokens are the document's).")
        docs = [texts] if isinstance(texts, str) else list(texts)
        if doc_ids is not None and len(doc_ids) != len(docs):
            raise ValueError(f"Got {len(docs)} documents but {len(doc_ids)} doc_ids.")
        if metadatas is not None and len(metadatas) != len(docs):
            raise ValueError(f"Got {len(docs)} documents but {len(metadatas)} metadatas.")
        encoded = []
        for i, doc in enumerate(docs):
            if not isinstance(doc, str) or not doc.strip():
                raise ValueError(f"Document {i} is empty: there is nothing to ingest. Pass non-empty text.")
            encoded.append(self.tokenize(doc))
        stats = IngestStats(documents=len(docs))
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, encoded)), unit="tok", desc=f"ingest[{namespace}]", disable=not progress)
        with torch.no_grad():
            for i, tokens in enumerate(encoded):
                state = _Stream(doc_id=doc_ids[i] if doc_ids else f"doc-{time.time_ns()}-{i}",
                                metadata=dict(metadatas[i]) if metadatas else {},
                                pending=[] if self.config.ingest_k == 0 else None,  # nothing retrieved: batch writes
                                isolated=context == "chunk")
                size = self.config.chunk_size if context == "chunk" else self.config.step
                for s in range(0, len(tokens), size):
                    step = tokens[s:s + size]
                    bar.update(len(step))
                    if strip:
                        stripped = self._stripped(step)
                        if stripped is None:  # whitespace only: nothing to store
                            state.offset = s + len(step)
                            continue
                        self._stream_step(stripped, state, namespace, span=(s, s + len(step)))
                    else:
                        self._stream_step(step, state, namespace)
                self._write_chunks(state, namespace, state.pending or [])
                stats.tokens += len(tokens)
                stats.chunk_ids += state.chunk_ids
        bar.close()
        stats.chunks = len(stats.chunk_ids)
        stats.seconds = time.perf_counter() - t0
        return stats

    def perplexity(self, text: str | Sequence[int], *, score_last: int = 2048, namespace: str | None = None,
                   use_memory: bool = True, progress: bool = False) -> dict[str, float]:
        """Perplexity of the last ``score_last`` tokens, the rest streamed through memory.

        ``use_memory=False`` gives the local-window baseline (same stream, nothing retrieved).
        Uses (and afterwards resets) a scratch namespace unless ``namespace`` is given.
        """
        tokens = self.tokenize(text) if isinstance(text, str) else list(text)
        if len(tokens) < 2:
            raise ValueError("Perplexity needs at least 2 tokens of text.")
        score_last = min(score_last, len(tokens) - 1)
        scratch = namespace is None
        ns = namespace or f"_ppl-{time.time_ns()}"
        state = _Stream(doc_id="ppl")
        first_scored = len(tokens) - score_last  # target index of the first scored token
        nll, count = 0.0, 0
        from tqdm.auto import tqdm

        try:
            with torch.no_grad():
                for s in tqdm(range(0, len(tokens), self.config.step), disable=not progress, desc="ppl"):
                    step = tokens[s:s + self.config.step]
                    want = s + len(step) > first_scored
                    logits = self._stream_step(step, state, ns, logits=want, retrieve=use_memory, write=use_memory,
                                               k=self.config.top_k if want else self.config.ingest_k)
                    if not want:
                        continue
                    targets = torch.as_tensor(tokens[s + 1:s + len(step) + 1], device=self.device)
                    lp = torch.log_softmax(logits[0, :len(targets)], -1).gather(1, targets[:, None])[:, 0]
                    idx = torch.arange(s + 1, s + 1 + len(targets), device=self.device)
                    sel = idx >= first_scored
                    nll -= lp[sel].sum().item()
                    count += int(sel.sum())
        finally:
            if scratch:
                self.bank.reset(ns)
        return {"tokens": len(tokens), "scored_tokens": count, "ppl": math.exp(nll / max(count, 1))}

    # ------------------------------------------------------------------ training / scoring
    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None, namespace: str = "default",
                chunk_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """One segment (``(1, T)``, ``T <= local_window``) with retrieved memory; differentiable.

        Memory: ``chunk_ids`` if given, else the namespace's ``top_k`` chunks found with the most recently
        stored chunk as the query (the segment's own tokens are never the query). ``labels`` (``(1, T)``,
        -100 = ignore) are shifted inside, as in transformers; returns ``{"logits", "loss"}``.
        """
        ids = input_ids.view(-1).tolist()
        if len(ids) > self.config.local_window:
            raise ValueError(f"Segment of {len(ids)} tokens exceeds local_window {self.config.local_window}.")
        if chunk_ids is None and self.config.top_k > 0:
            stored = self.bank.chunk_ids(namespace)
            if stored:
                query = self.bank.get(stored[-1], namespace=namespace).text
                chunk_ids = [h.chunk_id for h in self.bank.search(query, namespace=namespace, k=self.config.top_k,
                                                                  mode="dense")]
        ctx, start = self._context(self._memory(chunk_ids or [], namespace), None, 0)
        logits = self._run(ids, torch.arange(len(ids)) + start, ctx)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels.view(-1)[1:].to(logits.device), ignore_index=-100)
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str, *, namespace: str = "default", chunk_ids: Sequence[str] | None = None,
                 max_new_tokens: int = 64, stream: bool = False, chat: bool = False, retrieve: bool = True,
                 query: str | None = None, answer_prefix: str = "", temperature: float = 0.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> str | Iterator[str]:
        """Answer ``prompt`` with memory in the retrieval layers; only the prompt is encoded.

        Args:
            prompt: the text to continue (with ``chat=True``: a user message wrapped in the chat template).
            namespace: memory namespace to read.
            chunk_ids: explicit chunks to attend to (document order is restored); skips retrieval.
            max_new_tokens: generation budget.
            stream: return an iterator of text pieces instead of the full string.
            retrieve: with no ``chunk_ids``, search the namespace with ``query`` (default: the prompt).
            answer_prefix: text the answer starts with (prefilled after the prompt, not repeated in the output),
                e.g. ``"The pass key is"``; small models answer far better when the answer's form is forced.
            temperature: 0 = greedy; otherwise sampling with this temperature.
            stop: strings that end generation (not included in the output).

        With ``config.kv_refresh = r > 0`` the share ``r`` of the retrieved tokens is re-encoded first, next to the
        chunks retrieved with them (see :meth:`_refresh`; counted in ``last_generation.refreshed_tokens``).

        Raises:
            ValueError: empty prompt or a prompt longer than ``local_window``.
            memlong.memory.UnknownChunkError: a chunk id not in ``namespace``.
        """
        pieces = self._generate(prompt, namespace, chunk_ids, max_new_tokens, chat, retrieve, query, answer_prefix,
                                temperature, seed, tuple(stop))
        if stream:
            return pieces
        return "".join(pieces)

    def encode_prompt(self, prompt: str, chat: bool = False, answer_prefix: str = "") -> list[int]:
        """Token ids the decoder encodes for ``prompt`` (the leading sink/BOS token is shared, not re-encoded)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: give the model some text to answer.")
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        ids = self.tokenize(prompt + answer_prefix)
        if self._sink_ids and ids[:1] == self._sink_ids:
            ids = ids[1:]
        if len(ids) > self.config.local_window:
            raise ValueError(f"The prompt is {len(ids)} tokens, longer than the local window "
                             f"({self.config.local_window}). Put long context into memory with ingest() and ask a "
                             "shorter question, or raise local_window.")
        return ids

    def _generate(self, prompt, namespace, chunk_ids, max_new_tokens, chat, retrieve, query, answer_prefix,
                  temperature, seed, stop) -> Iterator[str]:
        t0 = time.perf_counter()
        ids = self.encode_prompt(prompt, chat, answer_prefix)
        if chunk_ids is None and retrieve and self.config.top_k > 0 and namespace in self.bank.namespaces():
            chunk_ids = [h.chunk_id for h in self.bank.search(query or prompt, namespace=namespace, k=self.config.top_k)]
        chunk_ids = list(chunk_ids or [])
        memory = self._memory(chunk_ids, namespace)  # raises UnknownChunkError before any work
        refreshed = 0
        if memory is not None and self.config.kv_refresh > 0 and len(chunk_ids) > 0:
            with torch.no_grad():
                memory, refreshed = self._refresh(memory, chunk_ids, namespace, self.config.kv_refresh)
        stats = GenerationStats(prompt_tokens=len(ids), chunk_ids=chunk_ids, refreshed_tokens=refreshed,
                                memory_tokens=0 if memory is None else int(memory[0].shape[2]))
        self.last_generation = stats
        return self._decode_loop(ids, memory, max_new_tokens, temperature, seed, stop, stats, t0)

    @functools.cached_property
    def _eos_ids(self) -> frozenset[int]:
        """Token ids that end an answer (computed once: ``get_vocab`` builds a dict of the whole vocabulary)."""
        eos = {t for t in (self.tokenizer.eos_token_id,) if t is not None}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if "<|im_end|>" in self.tokenizer.get_vocab():  # chat models' end of turn
            eos.add(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        return frozenset(eos)

    def _decode_loop(self, ids, memory, max_new_tokens, temperature, seed, stop, stats, t0) -> Iterator[str]:
        eos = self._eos_ids
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            ctx, pos = self._context(memory, None, 0, grow=True)
            if pos + len(ids) + max_new_tokens > self.max_positions:
                raise ValueError(f"Prompt + memory + max_new_tokens need {pos + len(ids) + max_new_tokens} positions; "
                                 f"the model has {self.max_positions}. Lower max_new_tokens or top_k.")
            logits = self._run(ids, torch.arange(len(ids)) + pos, ctx, logits_for=slice(-1, None))
            pos += len(ids)
            out: list[int] = []
            emitted = ""
            for _ in range(max_new_tokens):
                scores = logits[0, -1]
                if temperature and temperature > 0:
                    probs = torch.softmax(scores / temperature, -1).cpu()
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(scores.argmax())
                if token in eos:
                    break
                out.append(token)
                if stats.new_tokens == 0:
                    stats.time_to_first_token = time.perf_counter() - t0
                stats.new_tokens += 1
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    if cut > len(emitted):
                        yield text[len(emitted):cut]
                    break
                if not text.endswith("\ufffd") and len(text) > len(emitted):  # wait for complete characters
                    yield text[len(emitted):]
                    emitted = text
                if len(out) == max_new_tokens:
                    break
                logits = self._run([token], torch.tensor([pos]), ctx, logits_for=slice(-1, None))
                pos += 1
        stats.seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ memory control
    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace's memory, or all memory."""
        self.bank.reset(namespace)

    def memory_fingerprint(self) -> dict[str, Any]:
        """What stored K-V depend on: saved with the memory, compared when it is loaded (``model`` only warns)."""
        cfg = self.model.config
        return {"architecture": cfg.model_type, "num_layers": self.num_layers, "hidden_size": int(cfg.hidden_size),
                "kv_heads": self._kv_heads(), "head_dim": self._head_dim(), "vocab_size": int(cfg.vocab_size),
                "source_layers": list(self.config.source_layers), "kv_source": self.config.kv_source,
                "chunk_size": self.config.chunk_size, "model": str(getattr(cfg, "_name_or_path", "") or "")}

    def save_memory(self, path: str | Path, *, namespaces: Sequence[str] | None = None) -> Path:
        """Save the memory bank (or some ``namespaces``) to directory ``path`` with this model's fingerprint.

        Atomic: a save that dies midway leaves the previous save at ``path`` loadable. See
        :meth:`memlong.MemoryBank.save`.

        Example:
            >>> ml.ingest(open("hamlet.txt").read(), namespace="hamlet")
            >>> ml.save_memory("hamlet.memory")
            >>> MemLong.from_pretrained("default").load_memory("hamlet.memory")
        """
        return self.bank.save(path, namespaces=namespaces, fingerprint=self.memory_fingerprint())

    def load_memory(self, path: str | Path, *, namespaces: Sequence[str] | None = None) -> list[str]:
        """Load saved namespaces into this model's bank in place (same-named namespaces are replaced, others
        kept; adapters holding ``ml.bank`` see them). Returns the namespaces loaded.

        Raises:
            memlong.memory.MemoryMismatchError: the memory was made by another model, config or embedder
                (the message names both).
            memlong.memory.MemoryFileError: missing, truncated or corrupted files; this bank is left unchanged.
        """
        return self.bank.restore(path, namespaces=namespaces, fingerprint=self.memory_fingerprint())

    def __repr__(self) -> str:
        c = self.config
        return (f"MemLong({getattr(self.model.config, '_name_or_path', '?')!r}, layers={self.num_layers}, "
                f"kv_source={c.kv_source!r}, retrieval_layers={c.retrieval_layers}, top_k={c.top_k}, "
                f"local_window={c.local_window}, bank={self.bank!r})")


class _Stop(Exception):
    """Raised by a forward hook to end a forward after the layer it is registered on."""


def _stop(module, args, output):
    raise _Stop
