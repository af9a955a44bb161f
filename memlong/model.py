"""`MemLong`: a pretrained Llama-family decoder + a `MemoryBank` + retrieval causal attention.

This file holds the model itself: loading (and merging a trained adapter), the public run step every caller
above builds on, and the delegation to the modules that hold one idea each::

    model.py       MemLong: properties, ``run`` (one forward with memory), ``memory_for``, thin public methods
    loading.py     supported decoders, ``from_pretrained`` (adapter merge), the bank, the memory fingerprint
    positions.py   the visible prefix [memory | sink | local cache] and its RoPE layout
    streaming.py   Stream (one document window by window), ingest, perplexity, IngestStats
    generation.py  the decode loop, stop handling, Generation / GenerationStats, score, the training forward
    refresh.py     kv_refresh (CacheBlend-style recompute of retrieved K-V)
    prompts.py     prompt layouts shared by the CLI and the framework adapters
    attention.py   the attention function registered with transformers (joint softmax over the prefix)

The public core API (``docs/api.md``): ``run``, ``memory_for``, ``refresh``, ``stream``, ``decode``, ``score``,
``generate`` (a :class:`~memlong.generation.Generation` with its own stats when ``stream=True``), ``ingest``,
``perplexity``, ``forward`` (training), and the properties ``sink_ids``, ``kv_heads``, ``head_dim``.

Example:
    >>> from memlong import MemLong
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> ml.ingest(open("hamlet.txt").read(), namespace="hamlet")
    >>> ml.generate("Who killed Polonius?", namespace="hamlet", max_new_tokens=20)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import torch

from memlong import generation, loading, refresh, streaming
from memlong.attention import AttentionContext, finish_capture, register
from memlong.config import MemLongConfig
from memlong.embedder import TextEmbedder
from memlong.generation import Generation, GenerationStats
from memlong.loading import SUPPORTED_ARCHITECTURES
from memlong.memory import MemoryBank
from memlong.positions import KV, Memory, SinkKV, build_context
from memlong.records import check_string
from memlong.static_kv import compiled_decoder
from memlong.streaming import IngestStats, Stream

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from memlong.reader import Reader

__all__ = ["GenerationStats", "IngestStats", "MemLong", "RunOutput", "SUPPORTED_ARCHITECTURES"]


class GenerateOptions(TypedDict, total=False):
    """The keywords of :meth:`MemLong.generate` besides ``stream`` (for type checkers: ``stream=True`` returns a
    :class:`~memlong.generation.Generation`, otherwise a ``str``)."""

    namespace: str
    chunk_ids: Sequence[str] | None
    max_new_tokens: int
    chat: bool
    retrieve: bool
    query: str | None
    answer_prefix: str
    temperature: float
    seed: int | None
    stop: str | Sequence[str]


@dataclass(repr=False)
class RunOutput:
    """What one :meth:`MemLong.run` computed."""

    logits: torch.Tensor | None  # (1, T', V) float32 for the positions selected by logits_for; None if none
    kv: KV | None  # with capture: the new tokens' pre-RoPE K-V per layer, (1, Hkv, T, D) each
    next_position: int  # the position a token after these would take

    def __repr__(self) -> str:  # shapes, not values (the dataclass repr printed every layer's K-V: 347,000 characters)
        kv = "None" if not self.kv else f"{len(self.kv)} layers of {tuple(next(iter(self.kv.values()))[0].shape)}"
        logits = None if self.logits is None else tuple(self.logits.shape)
        return f"RunOutput(logits={logits}, kv={kv}, next_position={self.next_position})"


class MemLong:
    """A decoder with a chunk-level K-V memory (MemLong, Liu et al. 2024).

    Args:
        model: a transformers causal LM of a supported architecture (``SUPPORTED_ARCHITECTURES``).
        tokenizer: its tokenizer.
        config: a :class:`MemLongConfig` (layer defaults are resolved against the model depth).
        embedder: the retriever embedder (default: packaged all-MiniLM-L6-v2).
        bank: an existing :class:`MemoryBank` to share, as it is (config storage options it lacks: ValueError).

    Attributes:
        last_generation: the stats of the latest ``generate`` call, **not thread-safe** (concurrent calls overwrite
            it); per-call stats: ``generate(..., stream=True).stats``.
        kv_cache: the :class:`~memlong.kv_cache.DeviceCache` above the bank (``memory_cache_bytes``), or ``None``.
    """

    def __init__(self, model: Any, tokenizer: Any, config: MemLongConfig | None = None, *,
                 embedder: TextEmbedder | str | None = None, bank: MemoryBank | None = None) -> None:
        loading.check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.num_layers = int(model.config.num_hidden_layers)
        self.config = loading.resolve_config(config, self.num_layers)
        register()
        model.config._attn_implementation = "memlong"
        model.eval()
        self.decoder = model.model  # embeddings + layers + final norm
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        loading.warn_model(model.config, self.config)
        self._sink_ids = loading.sink_ids(tokenizer, self.config)  # (in the fingerprint)
        self.bank = loading.check_shared_bank(self, bank) if bank is not None else loading.new_bank(self, embedder)
        self.kv_cache = loading.new_cache(self)
        self.last_generation = GenerationStats()
        self.sink_cache = SinkKV(self)  # the sink's K-V, computed on first use (memlong.positions)
        self.reader: Reader | None = None  # an attached reader adapter (memlong.reader.attach_reader)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", *, embedder: TextEmbedder | str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        adapter: str | Path | None = None, **config: Any) -> MemLong:
        """Load ``"default"`` (embedded SmolLM2-135M-Instruct), any HF model id, or a local path.

        Extra keywords are :class:`MemLongConfig` fields (``top_k=4, local_window=1024``), checked before the load.
        ``adapter``: a folder written by ``memlong train`` (:mod:`memlong.adapter`); its trained upper-layer
        weights are merged in and the config fields it was trained with (kv_source, position_layout, ...)
        become the defaults, which keywords still override.

        Example:
            >>> ml = MemLong.from_pretrained("default", top_k=4, local_window=1024)
        """
        return loading.load_pretrained(cls, name_or_path, embedder=embedder, device=device, dtype=dtype,
                                       adapter=adapter, config=config)

    def weights_changed(self) -> None:
        """Decoder weights changed (training, a merged adapter): the sink's K-V are recomputed on next use."""
        self.sink_cache.clear()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def sink_ids(self) -> list[int]:
        """The shared sink token (the tokenizer's BOS) at position 0 of every window; ``[]`` without a sink."""
        return list(self._sink_ids)

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (fewer than query heads with GQA)."""
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.model.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        cfg = self.model.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def attention_backend(self) -> str:
        """The kernel ``config.attention_backend`` resolves to (``"auto"``: sdpa; flex measured 2.4x slower on an H100)."""
        return "sdpa" if self.config.attention_backend == "auto" else self.config.attention_backend

    @functools.cached_property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end an answer (computed once: ``get_vocab`` builds a dict of the whole vocabulary)."""
        return generation.eos_ids(self)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (TypeError or ValueError: not a string, lone surrogates)."""
        return self.tokenizer(check_string(text, "text"), add_special_tokens=False)["input_ids"]

    def strip_sink(self, ids: Sequence[int]) -> list[int]:
        """``ids`` without a leading sink/BOS token: the sink is shared in the prefix, never encoded again.

        Example:
            >>> ml.strip_sink(ml.sink_ids + [42, 7])
            [42, 7]
        """
        ids = list(ids)
        return ids[1:] if self._sink_ids and ids[:1] == self._sink_ids else ids

    def encode_prompt(self, prompt: str, chat: bool = False, answer_prefix: str = "") -> list[int]:
        """Token ids the decoder encodes for ``prompt`` (the leading sink/BOS token is shared, not re-encoded)."""
        return generation.encode_prompt(self, prompt, chat, answer_prefix)

    # ------------------------------------------------------------------ the run step
    def context(self, memory: Memory | None = None, cache: KV | None = None, *, capture: bool = False,
                grow: bool = False) -> tuple[AttentionContext, int]:
        """The attention context with prefix ``[memory | sink | cache]`` and the position of the first new token
        (:func:`memlong.positions.build_context`): for :meth:`run` calls that continue one another.

        Example:
            >>> ctx, pos = ml.context(memory, grow=True)        # decoding: the context keeps each token's K-V
            >>> out = ml.run(ids, positions=torch.arange(len(ids)) + pos, context=ctx)
        """
        return build_context(self, memory, cache, capture=capture, grow=grow)

    def run(self, ids: Sequence[int] | torch.Tensor, *, memory: Memory | None = None,
            positions: torch.Tensor | None = None, context: AttentionContext | None = None, capture: bool = False,
            logits_for: slice | None = slice(None)) -> RunOutput:
        """One forward of token ids ``ids`` with retrieved ``memory`` in the retrieval layers.

        The tokens attend to ``[memory | sink | themselves]`` and sit right after that prefix (in the configured
        position layout) unless ``positions`` say otherwise. Differentiable outside ``torch.no_grad``.

        Args:
            ids: ``T`` token ids (without the sink: see :meth:`strip_sink`).
            memory: retrieved K-V from :meth:`memory_for` (``None``: the sink only).
            positions: ``(T,)`` positions of the tokens (default: right after the prefix).
            context: an :class:`~memlong.attention.AttentionContext` to run under instead of one built from
                ``memory`` (streams and decoding reuse theirs: :meth:`context`); needs
                ``positions``; it captures if it was built with ``capture``.
            capture: keep the tokens' pre-RoPE K-V (``RunOutput.kv``) when ``context`` is not given.
            logits_for: which positions get logits (``None``: none, e.g. when only K-V are wanted).

        Example:
            >>> out = ml.run(ml.encode_prompt("Who is Hamlet?"), memory=ml.memory_for(chunk_ids, "hamlet"),
            ...              logits_for=slice(-1, None))
            >>> out.logits.shape        # (1, 1, vocab)
        """
        ids_t = generation.token_tensor(ids, self.device, generation.vocab_rows(self))
        if context is None:
            context, start = self.context(memory, capture=capture)
            positions = torch.arange(ids_t.shape[1]) + start if positions is None else positions
        elif memory is not None or positions is None:
            raise ValueError("run(context=...) takes the memory from the context and needs positions.")
        positions = generation.position_tensor(positions, ids_t.shape[1], self.device)
        if context.capture:
            context.cos, context.sin = self.decoder.rotary_emb(torch.zeros(1, device=self.device), positions)
        decoder = compiled_decoder(self) if context.compiled else self.decoder  # config.stream_compile
        hidden = decoder(input_ids=ids_t, position_ids=positions, use_cache=False,
                         memlong_context=context).last_hidden_state  # (1, T, H)
        logits = None if logits_for is None else self.model.lm_head(hidden[:, logits_for]).float()
        return RunOutput(logits=logits, kv=finish_capture(context) if context.capture else None,
                         next_position=int(positions[0, -1]) + 1)

    def memory_for(self, chunk_ids: Sequence[str], namespace: str) -> Memory | None:
        """Stored K-V of ``chunk_ids`` in document order on the model's device: ``(keys, values)``, each
        ``(L_src, Hkv, M, D)`` (``L_src``: ``config.source_layers``); ``None`` for no ids.

        Raises:
            memlong.memory.UnknownChunkError: an id not in ``namespace``.
            ValueError: K-V stored by another model or ``kv_source`` (the shapes do not match).
        """
        return loading.fetch_memory(self, chunk_ids, namespace)

    def refresh(self, memory: Memory, chunk_ids: Sequence[str], namespace: str,
                share: float | None = None, head: int | None = None) -> tuple[Memory, int]:
        """Re-encode each chunk's first ``head`` tokens (``config.kv_reencode_head``) and the ``share``
        (``config.kv_refresh``) of other retrieved tokens whose K-V differ most; returns (memory, count)."""
        return refresh.refresh(self, memory, chunk_ids, namespace, self.config.kv_refresh if share is None else share,
                               head=self.config.kv_reencode_head if head is None else head)

    # ------------------------------------------------------------------ streaming
    def stream(self, namespace: str, *, doc_id: str | None = None, metadata: dict[str, Any] | None = None) -> Stream:
        """A :class:`~memlong.streaming.Stream` that reads one document into ``namespace`` window by window.

        Example:
            >>> s = ml.stream("doc")
            >>> logits = s.step(tokens[:512], logits=True, k=ml.config.top_k)   # (1, 512, V)
            >>> s.flush()
        """
        return Stream(self, namespace, doc_id=doc_id, metadata=metadata)

    def ingest(self, texts: str | Sequence[str], *, namespace: str = "default", doc_ids: Sequence[str] | None = None,
               metadatas: Sequence[dict[str, Any]] | None = None, progress: bool = True,
               context: Literal["document", "chunk"] = "document", strip: bool = False) -> IngestStats:
        """Stream documents of any length into memory, window by window; returns this call's
        :class:`IngestStats`. Arguments and errors: :func:`memlong.streaming.ingest`.

        Example:
            >>> stats = ml.ingest(open("hamlet.txt").read(), namespace="hamlet")
            >>> stats.chunks, stats.tokens_per_second
        """
        return streaming.ingest(self, texts, namespace=namespace, doc_ids=doc_ids, metadatas=metadatas,
                                progress=progress, context=context, strip=strip)

    def perplexity(self, text: str | Sequence[int], *, score_last: int = 2048, namespace: str | None = None,
                   use_memory: bool = True, progress: bool = False) -> dict[str, float]:
        """Perplexity of the last ``score_last`` tokens, the rest streamed through memory
        (``use_memory=False``: the local-window baseline); details: :func:`memlong.streaming.perplexity`.

        Example:
            >>> ml.perplexity(open("macbeth.txt").read(), score_last=2048)
            {'tokens': ..., 'scored_tokens': 2048, 'ppl': ...}
        """
        return streaming.perplexity(self, text, score_last=score_last, namespace=namespace, use_memory=use_memory,
                                    progress=progress)

    # ------------------------------------------------------------------ training / scoring
    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None, namespace: str = "default",
                chunk_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """One segment (``(1, T)``, ``T <= local_window``) with retrieved memory; differentiable. ``labels``
        (``(1, T)``, -100 = ignore) are shifted inside, as in transformers; returns ``{"logits"}`` (``"loss"`` too
        with ``labels``). Which memory (``chunk_ids``, else retrieved): :func:`memlong.generation.segment_forward`."""
        return generation.segment_forward(self, input_ids, labels=labels, namespace=namespace, chunk_ids=chunk_ids)

    def score(self, ids: Sequence[int], target: Sequence[int], memory: Memory | None = None) -> torch.Tensor:
        """Teacher-forced log-probabilities ``(len(target),)`` of ``target`` after ``ids`` with ``memory``.

        Example:
            >>> -ml.score(ml.encode_prompt("The pass key is"), ml.tokenize(" 12345")).mean()   # mean NLL
        """
        return generation.score(self, ids, target, memory)

    # ------------------------------------------------------------------ generation
    @overload
    def generate(self, prompt: str, *, stream: Literal[False] = False, **options: Unpack[GenerateOptions]) -> str: ...
    @overload
    def generate(self, prompt: str, *, stream: Literal[True], **options: Unpack[GenerateOptions]) -> Generation: ...
    @overload
    def generate(self, prompt: str, *, stream: bool, **options: Unpack[GenerateOptions]) -> str | Generation: ...
    def generate(self, prompt: str, *, namespace: str = "default", chunk_ids: Sequence[str] | None = None,
                 max_new_tokens: int = 64, stream: bool = False, chat: bool = False, retrieve: bool = True,
                 query: str | None = None, answer_prefix: str = "", temperature: float = 0.0,
                 seed: int | None = None, stop: str | Sequence[str] = ()) -> str | Generation:
        """Answer ``prompt`` with memory in the retrieval layers; only the prompt is encoded. Returns the text, or
        with ``stream=True`` a :class:`~memlong.generation.Generation` (text pieces + this call's own ``stats``;
        the stats are also left in ``last_generation``, not thread-safe). Arguments and errors:
        :func:`memlong.generation.start_generation`.

        Example:
            >>> g = ml.generate("Who killed Polonius?", namespace="hamlet", stream=True)
            >>> answer, stats = g.text(), g.stats
        """
        gen = generation.start_generation(self, prompt, namespace=namespace, chunk_ids=chunk_ids,
                                          max_new_tokens=max_new_tokens, chat=chat, retrieve=retrieve, query=query,
                                          answer_prefix=answer_prefix, temperature=temperature, seed=seed, stop=stop)
        self.last_generation = gen.stats
        return gen if stream else gen.text()

    def decode(self, ids: Sequence[int], memory: Memory | None = None, *, max_new_tokens: int = 64,
               temperature: float = 0.0, seed: int | None = None, stop: str | Sequence[str] = ()) -> Generation:
        """Continue prompt token ids ``ids`` (without the sink) with ``memory``: the decode loop ``generate`` uses,
        for callers that build their own ids and memory (evaluations, benchmarks).

        Example:
            >>> ml.decode(ml.encode_prompt("The pass key is"), ml.memory_for(chunk_ids, "doc"), max_new_tokens=8).text()
        """
        return generation.decode(self, ids, memory, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed, stop=stop)

    # ------------------------------------------------------------------ memory control
    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace's memory, or all memory."""
        self.bank.reset(namespace)

    def memory_fingerprint(self) -> dict[str, Any]:
        """What stored K-V depend on (shapes, config, a weights hash): saved with the memory, checked on load."""
        return loading.memory_fingerprint(self)

    def save_memory(self, path: str | Path, *, namespaces: Sequence[str] | None = None) -> Path:
        """Save the memory bank (or some ``namespaces``) to directory ``path`` with this model's fingerprint;
        atomic: a save that dies midway leaves the previous save at ``path`` loadable (:meth:`MemoryBank.save`).

        Example:
            >>> ml.save_memory("hamlet.memory")    # after ml.ingest(..., namespace="hamlet")
            >>> MemLong.from_pretrained("default").load_memory("hamlet.memory")
        """
        return self.bank.save(path, namespaces=namespaces, fingerprint=self.memory_fingerprint())

    def load_memory(self, path: str | Path, *, namespaces: Sequence[str] | None = None) -> list[str]:
        """Load saved namespaces into this model's bank in place (same-named namespaces are replaced, others
        kept; adapters holding ``ml.bank`` see them). Returns the namespaces loaded.

        Raises:
            memlong.memory.MemoryMismatchError: made by another model, config or embedder (both named).
            memlong.memory.MemoryFileError: missing, truncated or corrupted files; this bank is left unchanged.
        """
        return self.bank.restore(path, namespaces=namespaces, fingerprint=self.memory_fingerprint())

    def __repr__(self) -> str:
        return loading.describe(self)
