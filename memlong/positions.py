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

from typing import TYPE_CHECKING

import torch

from memlong.attention import AttentionContext, rotate

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["KV", "Memory", "build_context", "rope", "sink_kv"]

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> pre-RoPE (keys, values), each (1, Hkv, T, D)
Memory = tuple[torch.Tensor, torch.Tensor]  # retrieved (keys, values), each (L_src, Hkv, M, D), pre-RoPE


def rope(ml: MemLong, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(1, T, D)`` of the model's own rotary embedding at ``positions`` ``(T,)``."""
    probe = torch.zeros(1, dtype=torch.float32, device=ml.device)
    return ml.decoder.rotary_emb(probe, positions.view(1, -1).to(ml.device))


def sink_kv(ml: MemLong) -> KV:
    """Pre-RoPE K-V of the sink token per layer (empty without a sink).

    A lone first token attends only to itself, so its K-V are the same in every window: computed once per
    weights (:meth:`MemLong.weights_changed` drops them).
    """
    if ml._sink_cache is None:
        ml._sink_cache = {}
        if ml.sink_ids:
            ctx = AttentionContext(capture=True, backend="eager")
            with torch.no_grad():
                ml.run(ml.sink_ids, positions=torch.zeros(1, dtype=torch.long), context=ctx, logits_for=None)
            ml._sink_cache = ctx.captured
    return ml._sink_cache


def _starts(layout: str, has_sink: bool, n_mem: int) -> tuple[int, int]:
    """Positions of the first memory token and of the first cache token."""
    if layout == "continual":
        base = 1 if has_sink else 0
        return base, base + n_mem
    return 0, 1  # "zero": memory keys unrotated at 0, local tokens re-based from 1


def build_context(ml: MemLong, memory: Memory | None = None, cache: KV | None = None, *, capture: bool = False,
                  grow: bool = False) -> tuple[AttentionContext, int]:
    """The attention context whose prefix is ``[memory | sink | cache]`` in every layer, rotated to the layout.

    Args:
        ml: the model.
        memory: retrieved K-V (``MemLong.memory_for``); only retrieval layers see it.
        cache: a stream's local cache (pre-RoPE, per layer); ``None`` or empty for none.
        capture: keep the new tokens' pre-RoPE K-V in ``ctx.captured``.
        grow: the context keeps the new tokens' K-V for the next call (token-by-token decoding).

    Without ``capture`` or ``cache`` (answer time: ``run``, decoding, scoring) retrieved memory is read with APE's
    ``config.memory_temperature`` / ``memory_scale`` when either is not 1 (:func:`memlong.attention.ape_attention`).

    Returns:
        The context and the position of the first new token.
    """
    cfg = ml.config
    sink = sink_kv(ml)
    n_mem = 0 if memory is None else memory[0].shape[2]
    cache_len = cache[0][0].shape[2] if cache else 0
    mem_start, cache_start = _starts(cfg.position_layout, bool(sink), n_mem)
    ctx = AttentionContext(capture=capture, grow=grow, backend=ml.attention_backend)
    # answer-time reads (run/decode/score): not contexts that store K-V (streams, refresh); APE and a reader apply
    ctx.reads_memory = bool(n_mem) and not (capture or cache_len)
    if ctx.reads_memory and (cfg.memory_temperature, cfg.memory_scale) != (1.0, 1.0):
        ctx.ape = (float(cfg.memory_temperature), float(cfg.memory_scale))
    tables = {}
    if n_mem:
        zero = cfg.position_layout == "zero"
        tables["mem"] = rope(ml, torch.zeros(n_mem, dtype=torch.long) if zero else torch.arange(n_mem) + mem_start)
    if sink:
        tables["sink"] = rope(ml, torch.zeros(1, dtype=torch.long))
    if cache_len:
        tables["cache"] = rope(ml, torch.arange(cache_len) + cache_start)
    retrieval = set(cfg.retrieval_layers)
    for layer in range(ml.num_layers):
        ks, vs = [], []
        if n_mem and layer in retrieval:
            src = cfg.source_index(layer)
            ks.append(rotate(memory[0][src].unsqueeze(0), *tables["mem"]))  # (1, Hkv, M, D)
            vs.append(memory[1][src].unsqueeze(0))
            ctx.memory_len[layer] = n_mem
        if sink:
            ks.append(rotate(sink[layer][0], *tables["sink"]).to(ml.dtype))  # (1, Hkv, 1, D)
            vs.append(sink[layer][1].to(ml.dtype))
        if cache_len:
            ks.append(rotate(cache[layer][0], *tables["cache"]))  # (1, Hkv, C, D)
            vs.append(cache[layer][1])
        if ks:
            ctx.prefix[layer] = (torch.cat(ks, 2), torch.cat(vs, 2))
    return ctx, cache_start + cache_len
