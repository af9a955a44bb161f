"""Retrieval causal attention, plugged into transformers through its attention-function registry.

Contract of one attention call (one layer, one forward):
    queries ``q``: ``(B, H, Lq, D)`` of the new tokens, already rotated by the model at their positions;
    keys/values = ``[prefix | local | new]`` where
        * prefix: K-V every query may see (retrieved memory of this layer, the attention sink, and
          while streaming the bounded local cache), already rotated to their layout positions;
        * local: K-V of earlier tokens of the same generation call (decode cache);
        * new: the K-V of the queries' own tokens, causal.
    One joint softmax over all of them (memory visible to every query, local causal), never two
    softmaxes summed. GQA: ``n_kv_heads`` may divide ``H``.

Backends computing the same function: ``eager`` (explicit float32 softmax; the reference used in
tests), ``sdpa`` (one SDPA call with a boolean mask; fast enough on CPU and for decode), ``flex``
(FlexAttention with a block mask; measured 2.4x slower than ``sdpa`` for ingestion on an H100, so ``"auto"`` is
``sdpa`` everywhere; with gradients on a CPU, where FlexAttention has no backward, ``flex`` runs ``sdpa``).

The model (`memlong.model`) sets a :class:`AttentionContext` on the forward call through the
``memlong_context`` keyword, which transformers forwards untouched to every attention call.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

__all__ = ["ATTN_NAME", "AttentionContext", "Blend", "ape_attention", "finish_capture", "joint_attention", "register",
           "rotate", "unrotate"]

ATTN_NAME = "memlong"


# ------------------------------------------------------------------ RoPE helpers
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply RoPE: ``x`` (B, h, T, D) pre-RoPE, ``cos``/``sin`` (B, T, D) from the model's rotary module.

    ``x * cos + rotate_half(x) * sin``, bit for bit, with temporaries of half its size instead of three of its size
    (the retrieved memory of a question is rotated here: 8 x 512 tokens of the default model are 47 MB in float32);
    ``out``: where to write it (a slice of a larger buffer; not for inputs that need gradients)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    out = torch.mul(x, cos) if out is None else torch.mul(x, cos, out=out)
    out[..., :half] -= x[..., half:] * sin[..., :half]  # not addcmul_: its fused rounding differs from the model's
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert :func:`rotate` (also for RoPE variants whose cos/sin carry a scaling factor)."""
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    xf = x.float()
    return ((xf * cos - _rotate_half(xf) * sin) / (cos * cos + sin * sin)).to(x.dtype)


# ------------------------------------------------------------------ the joint softmax
def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attention_eager(q, k, v, n_visible, scaling):
    """Exact reference: explicit mask, float32 softmax. Shapes: q (B,H,Lq,D), k/v (B,Hkv,Lk,D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups).float(), _expand_kv(v, groups).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~_mask(q.shape[2], k.shape[2], n_visible, q.device), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


@functools.lru_cache(maxsize=8)
def _mask(lq: int, lk: int, n_visible: int, device) -> torch.Tensor:
    """(Lq, Lk) bool: key j visible to query i iff j < n_visible or j - n_visible <= i. Cached: every layer
    of a forward asks for the same mask (callers must not modify it)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return (j < n_visible) | (j - n_visible <= i)


# older torch releases' causal biases take no enable_gqa: there, grouped-query attention keeps the boolean mask
_BIAS_GQA = "enable_gqa" in inspect.signature(getattr(CausalBias, "_dispatch", lambda: None)).parameters


def _attention_sdpa(q, k, v, n_visible, scaling, dropout: float = 0.0, lower_right: bool | None = None):
    """``lower_right`` (default: on CUDA): express the mask as a lower-right-aligned causal bias (key j visible
    to query i iff j <= i + n_visible, the same mask), which SDPA runs with its flash/memory-efficient
    kernels; a boolean mask there falls back to slower kernels. On the CPU the cached boolean mask is faster."""
    lq, lk = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if lower_right is None:
        lower_right = q.is_cuda and (groups == 1 or _BIAS_GQA)
    if lq == 1:  # decode: everything is visible, no mask keeps SDPA on its fast kernels
        mask, causal = None, False
    elif n_visible == 0:
        mask, causal = None, True
    elif not lower_right and 2 * n_visible <= lq:
        return _causal_padded(q, k, v, n_visible, scaling, dropout, groups)
    elif lower_right:
        mask, causal = causal_lower_right(lq, lk), False
    else:
        mask, causal = _mask(lq, lk, n_visible, q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                          scale=scaling, enable_gqa=groups > 1)


def _causal_padded(q, k, v, n_visible, scaling, dropout, groups):
    """The visible-prefix-then-causal mask as a plain causal one: ``n_visible`` zero queries go in front, so the
    queries and keys line up and key j is visible to (real) query i iff j <= i + n_visible, the same mask. SDPA's
    CPU kernel skips the blocks above the diagonal only for ``is_causal``, so while the prefix is short (a stream's
    sink and a one-chunk cache: ingest steps) this is cheaper than the boolean mask (28 vs 40 ms for 1,024 queries
    after a 1-token sink, one thread); the padded rows' outputs are dropped."""
    pad = q.new_zeros(q.shape[0], q.shape[1], n_visible, q.shape[3])
    out = F.scaled_dot_product_attention(torch.cat([pad, q], 2), k, v, is_causal=True, dropout_p=dropout,
                                         scale=scaling, enable_gqa=groups > 1)
    return out[:, :, n_visible:]


_flex_compiled: Callable | None = None


def _attention_flex(q, k, v, n_visible, scaling):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    lq, lk = q.shape[2], k.shape[2]

    def visible_or_causal(b, h, qi, kj):
        return (kj < n_visible) | (kj - n_visible <= qi)

    fn = flex_attention
    if q.device.type == "cuda":
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=True)
        fn = _flex_compiled
    block = create_block_mask(visible_or_causal, None, None, lq, lk, device=q.device)
    return fn(q, k, v, block_mask=block, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_visible: int, scaling: float,
                    backend: str = "sdpa", dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention of ``q`` over ``k``/``v`` where the first ``n_visible`` keys are visible to every
    query and the last ``Lq`` keys (the queries' own tokens) are causal. Returns ``(B, H, Lq, D)``."""
    if k.shape[2] != n_visible + q.shape[2]:
        raise ValueError(f"expected {n_visible} visible + {q.shape[2]} causal keys, got {k.shape[2]}.")
    if backend == "eager":
        return _attention_eager(q, k, v, n_visible, scaling)
    if backend == "flex" and q.shape[2] > 1 and not (q.device.type == "cpu" and torch.is_grad_enabled()
                                                     and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _attention_flex(q, k, v, n_visible, scaling)  # (FlexAttention has no backward on a CPU: sdpa there)
    return _attention_sdpa(q, k, v, n_visible, scaling, dropout)


def ape_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_visible: int, n_memory: int, scaling: float,
                  temperature: float, scale: float) -> torch.Tensor:
    """:func:`joint_attention` with the first ``n_memory`` keys (retrieved chunks, C) read as APE reads them
    (Yang et al., ICLR 2025; DESIGN.md section 5): weights within C are ``softmax(s/T)`` and C and the other keys
    O are mixed by ``softmax([S*T*LSE_C(s/T), LSE_O(s)])``. Done as one softmax: C's logits become
    ``s/T + (S*T - 1) * LSE_C(s/T)``, which gives C exactly that total mass. ``T = S = 1`` is the joint softmax.

    Explicit float32 scores (the memory part needs its own log-sum-exp), so meant for answer-time prompts and
    decoding, not long windows. Shapes as in :func:`joint_attention`; returns ``(B, H, Lq, D)``.

    Example:
        >>> out = ape_attention(q, k, v, n_visible=k.shape[2] - q.shape[2], n_memory=512, scaling=0.125,
        ...                     temperature=0.9, scale=0.9)
    """
    if not 0 < n_memory <= n_visible:
        raise ValueError(f"n_memory ({n_memory}) must be in 1..n_visible ({n_visible}).")
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups).float(), _expand_kv(v, groups).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~_mask(q.shape[2], k.shape[2], n_visible, q.device), float("-inf"))
    mem = scores[..., :n_memory] / temperature  # (B, H, Lq, C): memory is visible to every query
    if scale * temperature != 1.0:
        mem = mem + (scale * temperature - 1.0) * torch.logsumexp(mem, dim=-1, keepdim=True)
    scores = torch.cat([mem, scores[..., n_memory:]], dim=-1)
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


# ------------------------------------------------------------------ per-forward context
@dataclass
class AttentionContext:
    """What one forward call of the model attends to besides its own tokens.

    ``prefix[layer]``: (keys, values) ``(B, Hkv, P, D)``, rotated, visible to every query (memory, sink,
    streaming cache). ``local[layer]``: rotated K-V of earlier tokens of this context (decode cache),
    extended in place by every forward when ``grow`` is set. ``capture``: keep the new tokens'
    pre-RoPE keys and values per layer in ``captured`` (what the bank and the streaming cache store), and all layers
    stacked in ``stacked`` (``(L, Hkv, T, D)`` each; ``captured[layer]`` are views of it). The attention calls only
    collect the rotated keys in ``pending``; :func:`finish_capture` (called by ``MemLong.run`` after the forward)
    undoes RoPE for every layer at once, one batched call instead of one per layer.
    ``cos``/``sin``: rotary tables of the new tokens, needed to undo RoPE for capture.
    ``memory_len[layer]``: how many of that layer's prefix keys are retrieved memory (they come first);
    ``ape``: ``(temperature, scale)`` to read them with (:func:`ape_attention`), ``None`` for the joint softmax.
    ``reads_memory``: an answer-time read of retrieved memory (``run``, decoding, scoring with memory; nothing is
    stored and no stream cache is attended): the forwards a reader adapter (:mod:`memlong.reader`) applies to.
    """

    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    local: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    grow: bool = False
    capture: bool = False
    backend: str = "sdpa"
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    blend: Blend | None = None
    memory_len: dict[int, int] = field(default_factory=dict)
    ape: tuple[float, float] | None = None
    reads_memory: bool = False
    static: Any = None  # a memlong.static_kv.StaticKV: K-V in preallocated buffers (decode_mode "static"/"compiled")
    compiled: bool = False  # run through the compiled decoder (a streaming step with config.stream_compile)


@dataclass
class Blend:
    """Recompute some prefix tokens in place (``MemLongConfig.kv_refresh``): the new tokens *are* prefix tokens.

    ``slots`` ``(Lq,)``: the prefix index whose K-V each new token's fresh K-V replace for this call (the caller
    reads them from ``captured``). ``visible`` ``(Lq, P)``: which prefix keys each new token sees (those at its
    position or before). No other keys are attended.
    """

    slots: torch.Tensor
    visible: torch.Tensor


def memlong_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, memlong_context: AttentionContext | None = None, **kwargs):
    """The function registered as ``attn_implementation="memlong"``; returns ``(B, Lq, H, D), None``."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    ctx = memlong_context
    if ctx is None:  # a plain call (no memory, e.g. a full-attention baseline): ordinary causal attention
        if attention_mask is not None:  # a padded batch (_mask_for_padding): the stock SDPA path, mask and all
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        return _attention_sdpa(query, key, value, 0, scaling, dropout).transpose(1, 2).contiguous(), None
    if attention_mask is not None:
        raise ValueError("A forward with memory attends to one sequence: padded batches (an attention_mask with "
                         "zeros) are not supported. Run the rows one at a time.")
    layer = module.layer_idx
    if ctx.capture:
        ctx.pending[layer] = (key, value)  # rotated: finish_capture undoes RoPE for all layers at once
    if ctx.static is not None:
        return ctx.static.attend(layer, query, key, value, scaling).transpose(1, 2).contiguous(), None
    if ctx.blend is not None:
        return _blend_attention(query, key, value, ctx, layer, scaling), None
    parts_k, parts_v = [], []
    for store in (ctx.prefix, ctx.local):
        if layer in store:
            parts_k.append(store[layer][0].to(key.dtype))
            parts_v.append(store[layer][1].to(value.dtype))
    n_visible = sum(p.shape[2] for p in parts_k)
    if ctx.grow:
        old = ctx.local.get(layer)
        ctx.local[layer] = (key, value) if old is None else (torch.cat([old[0], key], 2), torch.cat([old[1], value], 2))
    k = torch.cat(parts_k + [key], dim=2) if parts_k else key
    v = torch.cat(parts_v + [value], dim=2) if parts_v else value
    n_memory = ctx.memory_len.get(layer, 0)
    if ctx.ape is not None and n_memory:
        out = ape_attention(query, k, v, n_visible, n_memory, scaling, *ctx.ape)
    else:
        out = joint_attention(query, k, v, n_visible, scaling, ctx.backend, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def finish_capture(ctx: AttentionContext) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Move the keys and values collected by the forward (``ctx.pending``) into ``ctx.captured`` / ``ctx.stacked``,
    RoPE undone with one batched :func:`unrotate` over the layers (the same values as one call per layer: the
    operations are elementwise). A forward stopped early (``memlong.refresh``'s probe) captures the layers it ran."""
    if not ctx.pending:
        return ctx.captured
    layers = sorted(ctx.pending)
    keys = unrotate(torch.cat([ctx.pending[i][0] for i in layers]), ctx.cos, ctx.sin)  # (L, Hkv, T, D)
    values = torch.cat([ctx.pending[i][1] for i in layers])
    ctx.pending = {}
    ctx.stacked = (keys, values)
    ctx.captured = dict(zip(layers, zip(keys.split(1), values.split(1))))
    return ctx.captured


def _blend_attention(query, key, value, ctx: AttentionContext, layer: int, scaling: float) -> torch.Tensor:
    if layer not in ctx.prefix:
        raise ValueError(f"layer {layer} has no prefix to recompute tokens of.")
    pk, pv = ctx.prefix[layer]
    k = pk.index_copy(2, ctx.blend.slots, key.to(pk.dtype))
    v = pv.index_copy(2, ctx.blend.slots, value.to(pv.dtype))
    q = query
    groups = q.shape[1] // k.shape[1]
    if ctx.backend == "eager":
        k, v = _expand_kv(k, groups).float(), _expand_kv(v, groups).float()
        scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~ctx.blend.visible, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=ctx.blend.visible,
                                             scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()


def _mask_for_padding(*args, **kwargs):
    """The mask builder registered for ``"memlong"``: none (the attention function builds its own) unless the batch is
    padded. Then SDPA's mask: ``MemLong(model)`` switches the caller's own model object to this attention, and its
    plain padded forwards (batched generation, say) silently attended to the padding before; a forward with memory
    refuses a padded batch."""
    padding = kwargs.get("attention_mask")
    if padding is None or bool(padding.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> str:
    """Register the attention function (and a no-op mask builder) under ``"memlong"``; idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, memlong_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, _mask_for_padding)
        _registered = True
    return ATTN_NAME
