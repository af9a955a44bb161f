"""`MemLongConfig`: every knob of the method in one typed, validated dataclass.

Defaults follow the paper and its reference code where those make sense for a stock model:
chunks of 128 tokens, top-k 8, a 1,024-token local window and a 32,768-token memory. Layer choices
depend on the model's depth, so they are left as ``None`` and resolved by :meth:`MemLongConfig.resolve`
once the model is known.

Example (a doctest, run by tests/test_config.py):
    >>> cfg = MemLongConfig(top_k=4).resolve(num_layers=26)  # training-free default: kv_source="per_layer"
    >>> cfg.memory_layer, cfg.retrieval_layers == tuple(range(26)), cfg.source_layers == cfg.retrieval_layers
    (13, True, True)
    >>> paper = MemLongConfig(kv_source="memory_layer").resolve(num_layers=26)  # the paper's layers
    >>> paper.memory_layer, paper.retrieval_layers, paper.source_layers
    (13, (13, 17, 21, 25), (13,))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from memlong.choices import MEMORY_DTYPES, SEARCH_MODES, MemoryDtype, SearchMode

if TYPE_CHECKING:  # torch is imported when a dtype is asked for: the CLI parses its flags without it
    import torch

KVSource = Literal["memory_layer", "per_layer"]
PositionLayout = Literal["zero", "continual"]
AttentionBackend = Literal["auto", "sdpa", "flex", "eager"]

__all__ = ["MemLongConfig"]

# dtypes stored K-V may have (the bank keeps them in memory; float64 would only waste it)


@dataclass(kw_only=True)
class MemLongConfig:
    """Configuration of a :class:`memlong.MemLong` model.

    Attributes:
        chunk_size: tokens per memory chunk (the unit of retrieval and eviction).
        memory_layer: index ``m`` of the memory layer; layers ``0..m`` stay frozen in training.
            ``None``: half the model depth (13 for the paper's 26 layers).
        retrieval_layers: layers whose attention reads retrieved K-V. ``None`` resolves to the
            paper's four layers spread over ``m..L-1`` for ``kv_source="memory_layer"`` and to
            *every* layer for ``"per_layer"`` (measured best on the default model, see README).
            The strings ``"upper"`` (every layer ``m..L-1``) and ``"all"`` are accepted too.
        kv_source: ``"memory_layer"`` (the paper: all retrieval layers read the memory layer's
            stored K-V; needs fine-tuned upper layers) or ``"per_layer"`` (training-free: each
            retrieval layer reads the K-V it stored itself).
        position_layout: ``"continual"``: sink at 0, retrieved chunks at 1..M in document order,
            local tokens after them; ``"zero"``: memory keys unrotated (position 0), local tokens
            from 1 (the paper's layout, for fine-tuned models).
        top_k: chunks retrieved per window.
        ingest_top_k: chunks retrieved per window while *storing* a document (``ingest`` and the unscored
            prefix of ``perplexity``); ``None``: ``top_k``. Default 0: stored chunks carry the K-V of their
            local window only. On the default model that scored as well as retrieving while storing
            (Macbeth perplexity 27.63 with 0, 27.70 with 4, 27.77 with 8) and ingests faster, since attention
            over retrieved K-V in every layer is most of what ingestion costs beyond a plain prefill.
            With ``kv_source="memory_layer"`` the stored K-V never depend on it.
        local_window: tokens of local attention (the bounded cache while streaming).
        ingest_step: tokens processed per streaming step; the cache keeps the last ``local_window -
            ingest_step`` tokens between steps. ``None`` (default): ``ingest`` with document context and nothing
            retrieved while storing (``ingest_top_k=0``) takes steps of the window less one chunk (``store_step``,
            896 tokens: each step sees the previous step's last chunk; 0.84-0.92x of plain prefill on the CPU
            against 0.74-0.78x for half windows, with the same perplexity and passkey, and 81 of 100 planted facts
            answered against 77; docs/benchmarks-cpu.md); scoring (``perplexity``), training and ``ingest`` with
            ``ingest_top_k > 0`` take half-window steps (``step``), so every scored token sees at least half a
            window before it.
        attention_sink: keep one shared sink token (the tokenizer's BOS) at position 0 of every
            window, stream and generation; without one, retrieved K-V collapsed perplexity in our
            prototype (README).
        memory_capacity: tokens the bank holds per namespace before eviction.
        memory_max_bytes: bytes (K-V + embeddings + texts) the whole bank may hold; ``None``: no byte limit
            beyond ``memory_capacity`` per namespace (see :class:`memlong.memory.MemoryFullError`).
        evict_oldest: share of the oldest chunks always dropped on eviction (paper: 10 %).
        keep_newest: share of the newest chunks always kept on eviction (paper: 10 %; at least the newest chunk
            when > 0).
        memory_dtype: dtype of stored K-V (``"float16"`` halves memory; ``"float32"`` is exact).
        memory_device: where stored K-V lives: ``"auto"`` (default: ``"cpu"`` for a model on the CPU; for a
            model on CUDA, pinned CPU memory (or ``memory_path``'s files) with the chunks read most recently kept
            on the GPU, see ``memory_cache_bytes``), ``"cpu"`` (only retrieved chunks move to the model's
            device), ``"pinned"`` (CPU page-locked memory: faster copies to a GPU; needs CUDA) or ``"model"``
            (same device as the model: fastest time to first token, costs GPU memory for the whole bank).
        memory_cache_bytes: bytes of recently read chunks' K-V kept on the model's device above the bank, least
            recently read evicted first (:class:`memlong.kv_cache.DeviceCache`; it changes no result). ``None``
            (default): with ``memory_device="auto"`` on CUDA a quarter of the GPU memory free once the model is
            loaded, otherwise no cache; ``0``: no cache; an integer > 0: that budget with ``"auto"``, ``"cpu"``
            or ``"pinned"`` (``"model"`` has the whole bank on the device already).
        search_mode: how the bank ranks chunks for a text query (``generate``'s own retrieval and the
            framework retrievers): ``"dense"`` (the paper's embedding retriever), ``"lexical"`` (BM25) or
            ``"hybrid"`` (both, fused by reciprocal rank). Retrieval while streaming a document stays dense.
        kv_refresh: share of the retrieved tokens ``generate`` re-encodes with the other retrieved chunks before
            them (CacheBlend-style selective recompute, see ``MemLong.generate``). Stored chunk K-V never saw the
            chunks retrieved with them; ``0`` (default) uses them as stored (fastest), ``1`` re-encodes all
            retrieved tokens, which is exactly what pasting their text computes (no saving). Needs
            ``kv_source="per_layer"``, every layer a retrieval layer and the ``continual`` layout (the defaults).
        memory_temperature: APE's temperature ``T`` (Yang et al., "APE: Faster and Longer Context-Augmented
            Generation via Adaptive Parallel Encoding", ICLR 2025) on the retrieved-memory part of the joint
            softmax at answer time: weights within the memory are ``softmax(s / T)``, and memory and the rest
            (sink, prompt, generated tokens) are mixed by ``softmax([S*T*LSE_mem(s/T), LSE_rest(s)])``
            (DESIGN.md section 5). ``1`` (with ``memory_scale=1``) is the plain joint softmax, bit for bit
            (the option is then off). Must be > 0; APE's default is 0.9.
        memory_scale: APE's scale ``S`` on the memory's total attention mass (see ``memory_temperature``).
            Must be > 0; ``1`` with ``memory_temperature=1`` is off.
        kv_reencode_head: EPIC / LegoLink-style boundary re-encode (Hu et al., "EPIC: Efficient Position-Independent
            Context Caching", arXiv 2410.15332): re-encode the first ``n`` (0..32) tokens of every retrieved chunk
            at answer time (``generate``), each attending to the retrieved K-V before it, as ``kv_refresh`` does;
            those tokens carry the spurious attention a sequence start draws. Composes with ``kv_refresh`` (the
            share is ranked among the other tokens) and with ``memory_temperature`` / ``memory_scale``. ``0``: off.
            Needs the same settings as ``kv_refresh``. Measured (docs/rag-fidelity.md): 32 made the full-Hamlet demo
            answer at top-k 4 and 8 and lowered first-token KL to pasted text on two corpora, but turned the
            README quickstart's and the LangChain example's right answers wrong, so the library default stays 0
            (``memlong demo`` uses 32).
        memory_reader: read retrieved memory at answer time through the reader adapter attached to the model
            (:mod:`memlong.reader`, ``from_pretrained(adapter=...)`` with a reader), if one is; ``False``: the base
            model's reading, exactly. No effect without a reader.
        retrieve_next: with retrieval by search (``generate`` without ``chunk_ids``), also read the ``n`` (0..4)
            chunks that follow each retrieved chunk in its document, so that a sentence cut by a chunk boundary is
            read whole (text RAG's "next node" expansion); up to ``(1 + n) * top_k`` chunks are read. ``0``: off.
        memory_quantization: how stored K-V are kept: ``"none"`` (in ``memory_dtype``, exact) or ``"int8"`` (the
            KIVI layout: per-channel key and per-token value scales, dequantized on fetch; about half the bytes of
            float16; measured in docs/disk.md).
        memory_path: a directory for a disk bank: K-V go to append-only segment files there, memory-mapped, so
            only retrieved chunks are read (a corpus larger than RAM); ``None``: K-V in memory. A directory that
            already holds a disk bank is reopened (same model and settings); ``ml.bank.commit()`` makes it durable.
        memory_ann_chunks: namespaces with at least this many chunks (>= 1000) search an approximate IVF index
            (retrained as they double; deletes stay exact); ``None``: exact search at any size.
        attention_backend: ``"auto"`` (SDPA; FlexAttention measured 2.4x slower on an H100), ``"sdpa"``,
            ``"flex"`` or ``"eager"`` (the exact float32 reference).
        decode_mode: how ``decode``/``generate`` keep the tokens' K-V (:mod:`memlong.static_kv`): ``"static"``
            (default: one preallocated buffer per layer and call, written in place), ``"dynamic"`` (joined anew at
            every step), or ``"compiled"`` (static, the single-token step compiled with ``torch.compile``; on CUDA
            replayed as a CUDA graph; the first call compiles). Same outputs to float rounding.
        stream_compile: run streaming steps (``ingest``, ``perplexity``, ``Stream.step`` without gradients) through
            the decoder compiled with ``torch.compile`` (on CUDA as CUDA graphs), for ingestion bound by kernel
            launches on a GPU; full steps that read no memory only, two compilations per corpus (tens of seconds
            each for the default model on a CPU, where it gains nothing).
    """

    chunk_size: int = 128
    memory_layer: int | None = None
    retrieval_layers: Sequence[int] | Literal["upper", "all"] | None = None  # a tuple once resolved
    kv_source: KVSource = "per_layer"
    position_layout: PositionLayout = "continual"
    top_k: int = 8
    ingest_top_k: int | None = 0
    local_window: int = 1024
    ingest_step: int | None = None
    attention_sink: bool = True
    memory_capacity: int = 32_768
    memory_max_bytes: int | None = None
    evict_oldest: float = 0.10
    keep_newest: float = 0.10
    memory_dtype: MemoryDtype = "float16"
    memory_device: Literal["auto", "cpu", "pinned", "model"] = "auto"
    memory_cache_bytes: int | None = None
    # -- storage tier (issue 20): one block
    memory_quantization: Literal["none", "int8"] = "none"
    memory_path: str | os.PathLike[str] | None = None
    memory_ann_chunks: int | None = None
    # --
    attention_backend: AttentionBackend = "auto"
    decode_mode: Literal["static", "dynamic", "compiled"] = "static"
    stream_compile: bool = False
    search_mode: SearchMode = "dense"
    kv_refresh: float = 0.0
    # ---- reading several retrieved chunks (issue 15; DESIGN.md section 5): all off by default
    memory_temperature: float = 1.0
    memory_scale: float = 1.0
    kv_reencode_head: int = 0
    memory_reader: bool = True
    retrieve_next: int = 0

    # ------------------------------------------------------------------ helpers
    @property
    def ingest_k(self) -> int:
        """Chunks retrieved per window while storing (resolved ``ingest_top_k``)."""
        return self.top_k if self.ingest_top_k is None else self.ingest_top_k

    @property
    def torch_memory_dtype(self) -> torch.dtype:
        from memlong.dtypes import DTYPES

        return DTYPES[self.memory_dtype]

    @property
    def step(self) -> int:
        """Tokens per streaming step (resolved ``ingest_step``)."""
        return self.ingest_step if self.ingest_step is not None else max(self.chunk_size, self.local_window // 2)

    @property
    def store_step(self) -> int:
        """Tokens per step of ``ingest`` with document context: ``ingest_step`` if set; ``step`` when retrieving while
        storing; else the local window less one chunk (in whole chunks), so each step keeps one chunk of context."""
        if self.ingest_step is not None or self.ingest_k > 0:
            return self.step
        return max(self.chunk_size, (self.local_window // self.chunk_size - 1) * self.chunk_size)

    @property
    def source_layers(self) -> tuple[int, ...]:
        """Layers whose K-V the bank stores."""
        assert isinstance(self.retrieval_layers, tuple), "call resolve() first"
        if self.kv_source == "memory_layer":
            assert self.memory_layer is not None
            return (self.memory_layer,)
        return self.retrieval_layers

    def source_index(self, layer: int) -> int:
        """Index into the stored K-V that retrieval layer ``layer`` reads."""
        return 0 if self.kv_source == "memory_layer" else self.source_layers.index(layer)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["retrieval_layers"], Sequence) and not isinstance(data["retrieval_layers"], str):
            data["retrieval_layers"] = [int(i) for i in data["retrieval_layers"]]
        if data["memory_path"] is not None:  # JSON (an adapter's config), also from a Path
            data["memory_path"] = os.fspath(data["memory_path"])
        return data

    # --------------------------------------------------------------- validation
    def resolve(self, num_layers: int) -> MemLongConfig:
        """Return a copy with model-dependent defaults filled in, after validating every field.

        Raises:
            ValueError: naming the field, the bad value and what is allowed.
        """
        if num_layers < 2:
            raise ValueError(f"MemLong needs a model with at least 2 layers, got {num_layers}.")
        self = _plain(self)
        _check_types(self)
        _check(self.kv_source in ("memory_layer", "per_layer"),
               f"kv_source must be 'memory_layer' or 'per_layer', got {self.kv_source!r}.")
        _check(self.position_layout in ("zero", "continual"),
               f"position_layout must be 'zero' or 'continual', got {self.position_layout!r}.")
        _check(self.attention_backend in ("auto", "sdpa", "flex", "eager"),
               f"attention_backend must be one of auto, sdpa, flex, eager; got {self.attention_backend!r}.")
        _check(self.decode_mode in ("static", "dynamic", "compiled"),
               f"decode_mode must be one of static, dynamic, compiled; got {self.decode_mode!r}.")
        _check(self.memory_dtype in MEMORY_DTYPES,
               f"memory_dtype must be one of {list(MEMORY_DTYPES)}, got {self.memory_dtype!r}.")
        _check_storage(self)
        _check(self.search_mode in SEARCH_MODES,
               f"search_mode must be one of {', '.join(map(repr, SEARCH_MODES))}, got {self.search_mode!r}.")
        _check(self.memory_device in ("auto", "cpu", "pinned", "model"),
               f"memory_device must be 'auto', 'cpu', 'pinned' or 'model', got {self.memory_device!r}.")
        _check_sizes(self)
        _check(self.memory_max_bytes is None or (type(self.memory_max_bytes) is int and self.memory_max_bytes > 0),
               f"memory_max_bytes must be a positive integer or None, got {self.memory_max_bytes!r}.")
        _check(self.memory_capacity >= self.chunk_size,
               f"memory_capacity ({self.memory_capacity}) must hold at least one chunk ({self.chunk_size} tokens).")
        _check(0.0 <= self.evict_oldest < 1.0 and 0.0 <= self.keep_newest < 1.0  # as MemoryBank checks them
               and self.evict_oldest + self.keep_newest <= 1.0,
               f"evict_oldest ({self.evict_oldest}) and keep_newest ({self.keep_newest}) must be in [0, 1) "
               "and sum to at most 1.")
        _check(isinstance(self.kv_refresh, (int, float)) and not isinstance(self.kv_refresh, bool)
               and 0.0 <= self.kv_refresh <= 1.0,
               f"kv_refresh must be a share between 0 and 1, got {self.kv_refresh!r}.")
        _check_reading(self)
        memory_layer = num_layers // 2 if self.memory_layer is None else self.memory_layer
        _check(isinstance(memory_layer, int) and 0 <= memory_layer < num_layers,
               f"memory_layer must be in 0..{num_layers - 1} for this {num_layers}-layer model, got {memory_layer!r}.")

        layers = self.retrieval_layers
        if layers is None:
            layers = "all" if self.kv_source == "per_layer" else _spread(memory_layer, num_layers)
        if isinstance(layers, str) and layers == "all":  # (a numpy array compared with a string is ambiguous)
            layers = tuple(range(num_layers))
        elif isinstance(layers, str) and layers == "upper":
            layers = tuple(range(memory_layer, num_layers))
        elif isinstance(layers, str):
            raise ValueError(f"retrieval_layers must be a list of layer indices, 'upper' or 'all'; got {layers!r}.")
        layers = tuple(sorted(set(int(i) for i in layers)))
        _check(len(layers) > 0, "retrieval_layers is empty; give at least one layer index.")
        bad = [i for i in layers if not 0 <= i < num_layers]
        _check(not bad, f"retrieval_layers {bad} are out of range: this model has layers 0..{num_layers - 1}.")
        if self.kv_source == "memory_layer":
            below = [i for i in layers if i < memory_layer]
            _check(not below,
                   f"retrieval_layers {below} lie below memory_layer {memory_layer}: with kv_source='memory_layer' "
                   "every retrieval layer reads the memory layer's K-V, so it must be at or above it. "
                   "Raise them, lower memory_layer, or use kv_source='per_layer'.")
        if self.kv_refresh > 0 or self.kv_reencode_head > 0:
            option = f"kv_refresh={self.kv_refresh}" if self.kv_refresh > 0 else f"kv_reencode_head={self.kv_reencode_head}"
            _check(self.kv_source == "per_layer" and layers == tuple(range(num_layers))
                   and self.position_layout == "continual",
                   f"{option} re-encodes retrieved tokens in every layer at their positions, so every "
                   "layer must read its own stored K-V laid out in order: use kv_source='per_layer', "
                   "retrieval_layers='all' and position_layout='continual' (the defaults), or set it to 0.")
        return dataclasses.replace(self, memory_layer=memory_layer, retrieval_layers=layers)


def _plain(cfg: MemLongConfig) -> MemLongConfig:
    """``cfg`` with numpy scalars as Python ones (``top_k=np.int64(4)`` was refused as "not an integer"; the config
    is saved as JSON)."""
    changes = {f.name: getattr(cfg, f.name).item() for f in dataclasses.fields(cfg)
               if isinstance(getattr(cfg, f.name), np.generic)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _check_sizes(cfg: MemLongConfig) -> None:
    """Validate the token counts: chunk size, window, capacity, ingestion step, ``top_k``."""
    for name in ("chunk_size", "local_window", "memory_capacity", "ingest_step"):  # ingest_step: None = default
        value = getattr(cfg, name)
        _check((value is None and name == "ingest_step") or (_is_int(value) and value > 0),
               f"{name} must be a positive integer, got {value!r}.")
    _check(_is_int(cfg.top_k) and cfg.top_k >= 0, f"top_k must be an integer >= 0, got {cfg.top_k!r}.")
    _check(cfg.ingest_top_k is None or (_is_int(cfg.ingest_top_k) and cfg.ingest_top_k >= 0),
           f"ingest_top_k must be None or an integer >= 0, got {cfg.ingest_top_k!r}.")
    step, chunk, window = cfg.step, cfg.chunk_size, cfg.local_window
    if cfg.ingest_step is None:  # the default step is half the window (at least a chunk): say so, and the fix
        _check(window >= chunk, f"local_window ({window}) must be at least chunk_size ({chunk}).")
        _check(step % chunk == 0, f"The default ingest_step is half of local_window ({window} // 2 = {step}), which "
               f"must be a multiple of chunk_size ({chunk}): use a local_window that is a multiple of {2 * chunk} "
               f"(e.g. {max(1, round(window / (2 * chunk))) * 2 * chunk}), or set ingest_step.")
    _check(step % chunk == 0 and 0 < step <= window,
           f"ingest_step ({step}) must be a multiple of chunk_size ({chunk}) and at most local_window ({window}).")


def _check_types(cfg: MemLongConfig) -> None:
    """The types the range checks of :meth:`MemLongConfig.resolve` take for granted (a string share failed with
    a raw TypeError there, truthy strings passed as switches, ``retrieval_layers=(1.5, 2)`` became ``(1, 2)``)."""
    layers = cfg.retrieval_layers
    _check(layers is None or isinstance(layers, str)  # the strings are checked in resolve
           or (isinstance(layers, Collection) and all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                      for i in layers)),
           f"retrieval_layers must be a list of integer layer indices, 'upper' or 'all'; got {layers!r}.")
    _check(cfg.memory_layer is None or _is_int(cfg.memory_layer),
           f"memory_layer must be None (half the model depth) or an integer layer index, got {cfg.memory_layer!r}.")
    for name in ("attention_sink", "memory_reader", "stream_compile"):  # bools and 0 / 1 (truthy strings refused)
        value = getattr(cfg, name)
        _check(isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)),
               f"{name} must be True or False, got {value!r}.")
    for name in ("evict_oldest", "keep_newest"):
        value = getattr(cfg, name)
        _check(isinstance(value, numbers.Real) and not isinstance(value, bool),
               f"{name} must be a share (a number) in [0, 1), got {value!r}.")


def _check_storage(cfg: MemLongConfig) -> None:
    """Validate the storage-tier options (``memory_quantization``, ``memory_path``, ``memory_ann_chunks``,
    ``memory_cache_bytes``)."""
    _check(cfg.memory_quantization in ("none", "int8"),
           f"memory_quantization must be 'none' or 'int8', got {cfg.memory_quantization!r}.")
    _check(cfg.memory_path is None or (isinstance(cfg.memory_path, (str, os.PathLike)) and str(cfg.memory_path)),
           f"memory_path must be a directory path or None, got {cfg.memory_path!r}.")
    _check(cfg.memory_ann_chunks is None or (type(cfg.memory_ann_chunks) is int and cfg.memory_ann_chunks >= 1000),
           f"memory_ann_chunks must be None or an integer >= 1000, got {cfg.memory_ann_chunks!r}.")
    cache = cfg.memory_cache_bytes
    _check(cache is None or (type(cache) is int and cache >= 0),
           f"memory_cache_bytes must be None (automatic), 0 (off) or a byte count > 0, got {cache!r}.")
    _check(not cache or cfg.memory_device != "model",
           "memory_cache_bytes keeps chunks on the model's device above a bank elsewhere, but memory_device='model' "
           "puts the whole bank there: drop memory_cache_bytes, or use memory_device='auto'.")
    _check(cfg.memory_path is None or cfg.memory_device in ("auto", "cpu"),
           f"memory_path keeps K-V in memory-mapped files on the CPU: use memory_device='auto' or 'cpu', not "
           f"{cfg.memory_device!r}.")


def _check_reading(cfg: MemLongConfig) -> None:
    """Validate the options for reading several retrieved chunks (``memory_temperature`` .. ``kv_reencode_head``)."""
    for name in ("memory_temperature", "memory_scale"):
        value = getattr(cfg, name)
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf,
               f"{name} must be a number > 0 and finite (1 = plain attention, APE uses 0.9), got {value!r}.")
    _check(type(cfg.retrieve_next) is int and 0 <= cfg.retrieve_next <= 4,
           f"retrieve_next must be an integer chunk count in 0..4 (0 = off), got {cfg.retrieve_next!r}.")
    head = cfg.kv_reencode_head
    _check(type(head) is int and 0 <= head <= 32,
           f"kv_reencode_head must be an integer token count in 0..32 (0 = off), got {head!r}.")


def _spread(memory_layer: int, num_layers: int, count: int = 4) -> tuple[int, ...]:
    """The paper's choice for 26 layers, m=13: (13, 17, 21, 25): `count` layers evenly over m..L-1."""
    top = num_layers - 1
    if top == memory_layer:
        return (memory_layer,)
    return tuple(sorted({round(memory_layer + i * (top - memory_layer) / (count - 1)) for i in range(count)}))


def _is_int(value: object) -> bool:
    """A Python integer: not a bool, not a float such as 64.0 (the config is saved as JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
