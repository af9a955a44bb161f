"""Static-shape decoding (``MemLongConfig.decode_mode``): every layer's K-V in one preallocated buffer per call.

The dynamic path (``decode_mode="dynamic"``) joins ``[prefix | earlier tokens | new token]`` anew in every layer at
every step: a copy of the whole prefix per layer per token, and shapes that change with each token. Here each layer
gets one buffer of ``prefix + prompt + max_new_tokens`` slots (rounded up to 256) when the call starts: the prefix
(retrieved memory, sink) is copied in once and each forward writes its tokens' K-V in place at their slots.

* ``"static"`` (the default) attends to the slots written so far with the dynamic path's kernels
  (:func:`memlong.attention.joint_attention`), without its copies.
* ``"compiled"`` attends to the whole buffer with a mask (slot ``j`` is visible to a token at slot ``s`` iff
  ``j <= s``: the prefix comes first, the slots not written yet after), so the single-token step has the same
  shapes at every step and in every call of one buffer size, and compiles it with ``torch.compile`` (on CUDA with
  ``mode="reduce-overhead"``, which replays it as a CUDA graph; the buffers are pooled so that a graph finds them
  where it recorded them).

Both give the dynamic path's logits to float rounding (tests/test_static_decode.py compares every step).

Not for contexts read with APE (``memory_temperature`` / ``memory_scale``, :func:`memlong.attention.ape_attention`):
those decode on the dynamic path.

Example:
    >>> ml = MemLong.from_pretrained("default", decode_mode="static")
    >>> ml.decode(ml.encode_prompt("Who is Hamlet?"), ml.memory_for(ids, "hamlet"), max_new_tokens=16).text()
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from memlong.attention import AttentionContext, joint_attention

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["StaticKV", "compiled_decoder", "compiled_step", "start_static"]


# buffer lengths are rounded up to a multiple of this: calls whose memory and prompt differ by a few tokens share
# buffer shapes, so a compiled step (decode_mode="compiled") is compiled once for all of them
_BUCKET = 256

# decode_mode="compiled": buffers of finished calls, kept for the next call of the same shapes (a CUDA graph replays
# reading and writing them where they are; new buffers would be recorded again). key: (device, dtype, lengths)
_POOL: dict[tuple, list[dict[str, dict]]] = {}


class StaticKV:
    """One decode call's K-V: per layer ``(1, Hkv, slots, D)`` buffers, ``[prefix | tokens | free]``.

    Args:
        ctx: the call's context (``ml.context(memory)``, a prefix in every layer); its prefix is copied into the
            buffers and dropped.
        tokens: slots for the tokens after the prefix (prompt + new tokens); lengths are rounded up to ``_BUCKET``.
        pooled: the compiled step's buffers: taken from (and :meth:`release`\ d to) the pool of finished calls, and
            attended whole with a mask (fixed shapes); otherwise each forward attends to the slots written so far
            with the dynamic path's kernels (:func:`memlong.attention.joint_attention`), without its copies.

    ``advance(first, n)`` sets the slots and masks of the next forward's ``n`` tokens (the ``first``-th token after
    the prefix onwards); the attention call of each layer (``ctx.static``) writes their K-V there and attends.
    """

    def __init__(self, ctx: AttentionContext, tokens: int, *, dtype: torch.dtype, device: torch.device,
                 shape: tuple[int, int], pooled: bool = False) -> None:
        self.start = {layer: int(k.shape[2]) for layer, (k, _) in ctx.prefix.items()}  # slot of the first token
        self.length = {layer: -(-(n + tokens) // _BUCKET) * _BUCKET for layer, n in self.start.items()}
        self.tokens, self.device, self.masked, self.backend = tokens, device, pooled, ctx.backend
        self.ends: dict[int, int] = {}  # layer -> slots written after this forward
        self._key = (str(device), dtype, shape, tuple(sorted(self.length.items()))) if pooled else None
        free = _POOL.get(self._key) if pooled else None
        self.buffers = free.pop() if free else self._allocate(dtype, shape)
        for layer, (k, v) in ctx.prefix.items():
            self.buffers["keys"][layer][:, :, :k.shape[2]] = k
            self.buffers["values"][layer][:, :, :v.shape[2]] = v
        self.keys, self.values = self.buffers["keys"], self.buffers["values"]
        # this forward's slots (T,) and mask (T, length) per layer; single-token ones are written in place
        self.slots: dict[int, torch.Tensor] = dict(self.buffers["slot1"])
        self.masks: dict[int, torch.Tensor] = dict(self.buffers["mask1"])
        ctx.prefix = {}

    def _allocate(self, dtype: torch.dtype, shape: tuple[int, int]) -> dict[str, dict]:
        heads, dim = shape
        new = {name: {} for name in ("keys", "values", "slot1", "mask1")}
        shared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # one slot and mask per (start, length)
        for layer, length in self.length.items():
            for name in ("keys", "values"):
                new[name][layer] = torch.zeros(1, heads, length, dim, dtype=dtype, device=self.device)
            group = (self.start[layer], length)
            if group not in shared:
                shared[group] = (torch.zeros(1, dtype=torch.long, device=self.device),
                                 torch.zeros(1, length, dtype=torch.bool, device=self.device))
            new["slot1"][layer], new["mask1"][layer] = shared[group]
        if self.device.type == "cuda":  # a CUDA graph reads and writes them where they are: no copy per replay
            for store in new.values():
                for t in {id(t): t for t in store.values()}.values():
                    torch._dynamo.mark_static_address(t)
        return new

    def advance(self, first: int, n: int) -> None:
        """Place the next forward's ``n`` tokens at slots ``start + first ..`` of every layer."""
        if first + n > self.tokens:
            raise ValueError(f"the decode buffer holds {self.tokens} tokens after the prefix; {first + n} asked.")
        made: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, start in self.start.items():
            group = (start, self.length[layer])
            if group not in made:
                slots = torch.arange(n, device=self.device) + (start + first)
                made[group] = slots, torch.arange(group[1], device=self.device)[None, :] <= slots[:, None]
                if n == 1:
                    self.buffers["slot1"][layer].copy_(made[group][0])
                    self.buffers["mask1"][layer].copy_(made[group][1])
            self.ends[layer] = start + first + n
            one = n == 1
            self.slots[layer] = self.buffers["slot1"][layer] if one else made[group][0]
            self.masks[layer] = self.buffers["mask1"][layer] if one else made[group][1]

    def release(self) -> None:
        """The call is over: its buffers go back to the pool (``pooled`` calls only)."""
        if self._key is not None and self.buffers is not None:
            _POOL.setdefault(self._key, [])[:] = [self.buffers]  # one set per shape: the newest
        self.buffers = None

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Write ``key``/``value`` ``(1, Hkv, T, D)`` at this forward's slots and attend over the buffer;
        returns ``(1, H, T, D)``."""
        keys, values, slots = self.keys[layer], self.values[layer], self.slots[layer]
        keys.index_copy_(2, slots, key.to(keys.dtype))
        values.index_copy_(2, slots, value.to(values.dtype))
        if not self.masked:
            end = self.ends[layer]
            return joint_attention(query, keys[:, :, :end].to(query.dtype), values[:, :, :end].to(query.dtype),
                                   end - query.shape[2], scaling, self.backend)
        return F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype),
                                              attn_mask=self.masks[layer], scale=scaling,
                                              enable_gqa=query.shape[1] != keys.shape[1])


def start_static(ml: MemLong, ctx: AttentionContext, tokens: int) -> StaticKV | None:
    """Move ``ctx`` to static buffers for ``tokens`` tokens after its prefix (``None``: it stays dynamic: APE)."""
    if ctx.ape is not None:
        return None
    missing = [layer for layer in range(ml.num_layers) if layer not in ctx.prefix]
    if missing:  # no sink and no memory in some layers: a zero-width prefix keeps one code path
        empty = torch.zeros(1, ml.kv_heads, 0, ml.head_dim, dtype=ml.dtype, device=ml.device)
        ctx.prefix.update(dict.fromkeys(missing, (empty, empty)))
    ctx.static = StaticKV(ctx, tokens, dtype=ml.dtype, device=ml.device, shape=(ml.kv_heads, ml.head_dim),
                          pooled=ml.config.decode_mode == "compiled")
    ctx.grow = False
    return ctx.static


_COMPILED: dict[str, object] = {}
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # MemLong -> its compiled decoder


def _forward(decoder, lm_head, ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False, memlong_context=ctx).last_hidden_state
    return lm_head(hidden).float()


def compiled_step(ml: MemLong, token: int, position: int, ctx: AttentionContext) -> torch.Tensor:
    """Logits ``(1, 1, V)`` of one token at ``position`` through the compiled decoder (``decode_mode="compiled"``).

    One compiled function per device type, shared by every model and call: its inputs (token, position, the
    buffers reached through ``ctx``) change, their shapes do not, so nothing recompiles between steps or calls of
    one shape (tests/test_static_decode.py counts the compilations)."""
    kind = ml.device.type
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind == "cuda" else None
        _COMPILED[kind] = torch.compile(_forward, mode=mode, dynamic=False)
    ids = torch.tensor([[token]], device=ml.device)
    positions = torch.tensor([[position]], device=ml.device)
    return _COMPILED[kind](ml.decoder, ml.model.lm_head, ids, positions, ctx)


def compiled_decoder(ml: MemLong):
    """``ml.decoder`` compiled for fixed-shape streaming steps (``MemLongConfig.stream_compile``; on CUDA
    ``mode="reduce-overhead"``: each step replayed as CUDA graphs, not launched kernel by kernel).

    Only full steps that read no memory run through it (``Stream.step``): they have one shape once the local
    cache is full (``step_size`` tokens over sink + cache), so a corpus compiles twice: the first step of a
    document and the steady state; its last, shorter step runs eagerly. The
    captured K-V leave the compiled region through ``ctx.pending`` and are joined outside it (``finish_capture``),
    so no output of one replay is read after the next."""
    if ml not in _DECODERS:
        _DECODERS[ml] = torch.compile(ml.decoder, mode="reduce-overhead" if ml.device.type == "cuda" else None,
                                      dynamic=False)
    return _DECODERS[ml]
