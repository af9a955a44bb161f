"""Where memory sits: the visible prefix ``[retrieved memory | sink | local cache]`` and its rotary positions.

Every forward of :class:`memlong.MemLong` attends to a prefix built here. Stored keys are pre-RoPE, so they are
rotated to the positions of the configured layout just before use:

* ``"continual"`` (default): the sink at 0, retrieved chunks at ``1..M`` in document order, the local cache
  after them, then the new tokens;
* ``"zero"`` (the paper): memory keys unrotated (position 0), the local cache and new tokens re-based from 1.

Only retrieval layers see memory; every layer sees the sink and the cache.

Example:
    >>> memory = ml.memory_for(chunk_ids, "docs")        # keys/values (L_src, Hkv, M, D)
    >>> ctx, start = build_context(ml, memory)           # start: position of the first new token
    >>> ctx.prefix[0][0].shape                           # (1, Hkv, M + 1, D): memory + sink in layer 0
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from memlong.attention import AttentionContext, rotate

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["KV", "Memory", "SinkKV", "Stacked", "build_context", "rope", "sink_kv", "stacked"]

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> pre-RoPE (keys, values), each (1, Hkv, T, D)
Memory = tuple[torch.Tensor, torch.Tensor]  # retrieved (keys, values), each (L_src, Hkv, M, D), pre-RoPE


def rope(ml: MemLong, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(1, T, D)`` of the model's own rotary embedding at ``positions`` ``(T,)``."""
    probe = torch.zeros(1, dtype=torch.float32, device=ml.device)
    return ml.decoder.rotary_emb(probe, positions.view(1, -1).to(ml.device))


class SinkKV:
    """Pre-RoPE K-V of the sink token per layer, computed on first use once per weights (``ml.sink_cache``).

    A lone first token attends only to itself, so its K-V are the same in every window. Thread-safe: a caller
    arriving while the first computes them waits for them; a first computation that raises (Ctrl-C, out of memory)
    leaves nothing behind, and the next use computes them again. :meth:`MemLong.weights_changed` calls
    :meth:`clear`.
    """

    def __init__(self, ml: MemLong) -> None:
        self._ml, self._kv, self._computing = ml, None, False
        self._lock = threading.RLock()  # re-entered by the sink's own forward, which runs without a sink

    def get(self) -> KV:
        """The K-V (empty without a sink)."""
        kv = self._kv
        if kv is not None:
            return kv
        with self._lock:
            if self._kv is not None or self._computing:  # computed meanwhile, or the sink's own forward
                return self._kv if self._kv is not None else {}
            ml, self._computing = self._ml, True
            try:
                ctx = AttentionContext(capture=True, backend="eager")
                if ml.sink_ids:
                    with torch.no_grad():
                        ml.run(ml.sink_ids, positions=torch.zeros(1, dtype=torch.long), context=ctx, logits_for=None)
                self._kv = ctx.captured
            finally:
                self._computing = False
            return self._kv

    def clear(self) -> None:
        """The weights changed: compute the K-V again on next use."""
        with self._lock:
            self._kv = None


def sink_kv(ml: MemLong) -> KV:
    """Pre-RoPE K-V of the sink token per layer (empty without a sink); :class:`SinkKV`."""
    return ml.sink_cache.get()


def _starts(layout: str, has_sink: bool, n_mem: int) -> tuple[int, int]:
    """Positions of the first memory token and of the first cache token."""
    if layout == "continual":
        base = 1 if has_sink else 0
        return base, base + n_mem
    return 0, 1  # "zero": memory keys unrotated at 0, local tokens re-based from 1


# retrieved keys are rotated this many bytes of layers at a time: few calls for a usual read, and no full rotated copy
# of a large one (32 x 1,024 tokens of a 3B model's every layer are several GB)
_ROTATE_BYTES = 256 << 20

Stacked = tuple[torch.Tensor, torch.Tensor]  # every layer's pre-RoPE (keys, values), each (L, Hkv, T, D)


def stacked(kv: KV | Stacked | None) -> Stacked | None:
    """``kv`` with its layers stacked along the first dimension (``None`` for none or empty)."""
    if not kv:
        return None
    if isinstance(kv, tuple):
        return kv
    layers = sorted(kv)
    return torch.cat([kv[i][0] for i in layers]), torch.cat([kv[i][1] for i in layers])


def build_context(ml: MemLong, memory: Memory | None = None, cache: KV | Stacked | None = None, *,
                  capture: bool = False, grow: bool = False) -> tuple[AttentionContext, int]:
    """The attention context whose prefix is ``[memory | sink | cache]`` in every layer, rotated to the layout.

    Args:
        ml: the model.
        memory: retrieved K-V (``MemLong.memory_for``); only retrieval layers see it.
        cache: a stream's local cache (pre-RoPE): per layer, or every layer stacked (:data:`Stacked`); ``None`` or
            empty for none.
        capture: keep the new tokens' pre-RoPE K-V in ``ctx.captured``.
        grow: the context keeps the new tokens' K-V for the next call (token-by-token decoding).

    Without ``capture`` or ``cache`` (answer time: ``run``, decoding, scoring) retrieved memory is read with APE's
    ``config.memory_temperature`` / ``memory_scale`` when either is not 1 (:func:`memlong.attention.ape_attention`).

    The layers are rotated together (every layer's K-V have one shape in the supported architectures): sink and
    cache in one call, retrieved memory in blocks of layers of up to 256 MiB. A context costs a few dozen tensor
    operations instead of a dozen per layer; on a GPU a streaming step is bound by such launches (issue 21).

    Returns:
        The context and the position of the first new token.
    """
    from memlong.loading import check_memory  # (loading imports the bank, which needs nothing from here)

    check_memory(ml, memory)
    cfg = ml.config
    sink, cache = stacked(sink_kv(ml)), stacked(cache)
    n_mem = 0 if memory is None else memory[0].shape[2]
    cache_len = 0 if cache is None else cache[0].shape[2]
    mem_start, cache_start = _starts(cfg.position_layout, sink is not None, n_mem)
    ctx = AttentionContext(capture=capture, grow=grow, backend=ml.attention_backend)
    # answer-time reads (run/decode/score): not contexts that store K-V (streams, refresh); APE and a reader apply
    ctx.reads_memory = bool(n_mem) and not (capture or cache_len)
    if ctx.reads_memory and (cfg.memory_temperature, cfg.memory_scale) != (1.0, 1.0):
        ctx.ape = (float(cfg.memory_temperature), float(cfg.memory_scale))
    # [sink | cache] of every layer, rotated in one call: (L, Hkv, 1 + C, D)
    local = [kv for kv in (sink, cache) if kv is not None]
    keys = values = None
    if local:
        where = ([torch.zeros(1, dtype=torch.long)] if sink is not None else []) + [torch.arange(cache_len) + cache_start]
        keys = rotate(torch.cat([k.to(ml.dtype) for k, _ in local], 2), *rope(ml, torch.cat(where)))
        values = torch.cat([v.to(ml.dtype) for _, v in local], 2)
    prefix = dict(enumerate(zip(keys.split(1), values.split(1)))) if local else {}
    if n_mem:
        zero = cfg.position_layout == "zero"
        table = rope(ml, torch.zeros(n_mem, dtype=torch.long) if zero else torch.arange(n_mem) + mem_start)
        _add_memory(ml, memory, table, (keys, values) if local else None, prefix)
        ctx.memory_len = dict.fromkeys(cfg.retrieval_layers, n_mem)
    ctx.prefix = prefix
    return ctx, cache_start + cache_len


def _add_memory(ml: MemLong, memory: Memory, table: tuple[torch.Tensor, torch.Tensor], local: Stacked | None,
                prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the retrieved K-V, rotated by ``table``, in front of ``local`` (rotated ``[sink | cache]``, every layer)
    in the prefix of each retrieval layer; a block of layers per call.

    The rotated keys are written once, into the block's ``[memory | local]`` buffer (no index_select copy, rotate
    temporaries or concatenation: at 8 x 512 retrieved tokens these were most of the time to first token on a CPU);
    with gradients on (training) the plain operations are used."""
    cfg = ml.config
    retrieval = sorted(cfg.retrieval_layers)
    n_mem, n_local = memory[0].shape[2], 0 if local is None else local[0].shape[2]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*memory, *(local or ())))
    block = max(1, _ROTATE_BYTES // max(1, memory[0][0].numel() * memory[0].element_size()))
    for i in range(0, len(retrieval), block):
        layers = retrieval[i:i + block]
        src = [cfg.source_index(layer) for layer in layers]
        if grad:
            keys, values = rotate(_layers(memory[0], src), *table), _layers(memory[1], src)
            if local is not None:
                keys = torch.cat([keys, _layers(local[0], layers)], 2)
                values = torch.cat([values, _layers(local[1], layers)], 2)
        else:
            shape = (len(layers), memory[0].shape[1], n_mem + n_local, memory[0].shape[3])
            keys = memory[0].new_empty(shape)
            if len(set(src)) == 1 and len(src) > 1:  # memory_layer: one source for every layer, rotated once
                rotate(memory[0][src[0]:src[0] + 1], *table, out=keys[:1, :, :n_mem])
                keys[1:, :, :n_mem] = keys[:1, :, :n_mem]
            else:
                rotate(_layers(memory[0], src), *table, out=keys[:, :, :n_mem])
            if local is None:
                values = _layers(memory[1], src)  # a view where the layers are contiguous: attention only reads it
            else:
                values = memory[1].new_empty(shape)
                values[:, :, :n_mem] = _layers(memory[1], src)
                keys[:, :, n_mem:] = _layers(local[0], layers)
                values[:, :, n_mem:] = _layers(local[1], layers)
        prefix.update(zip(layers, zip(keys.split(1), values.split(1))))


def _layers(stack: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``stack[index]`` along the first dimension: a view when ``index`` is a run of consecutive layers or one
    layer repeated (broadcast), else a copy."""
    first = index[0]
    if index == list(range(first, first + len(index))):
        return stack[first:first + len(index)]
    if index == [first] * len(index):
        return stack[first:first + 1].expand(len(index), *stack.shape[1:])
    return stack.index_select(0, torch.tensor(index, device=stack.device))
