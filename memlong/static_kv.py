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
    >>> ml.decode(ml.encode_prompt("Who is Hamlet?"), ml.memory_for(chunk_ids, "hamlet"), max_new_tokens=16).text()
"""

from __future__ import annotations

import threading
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

# decode_mode="compiled": per MemLong, buffers of finished calls, kept for the next call of the same shapes (a CUDA
# graph replays reading and writing them where they are; new buffers would be recorded again). key: (device, dtype,
# head shape, each layer's group and buffer length); prefix lengths are not in it: they only set the first slot
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # MemLong -> {key: buffers}, newest shape last
_POOL_SHAPES = 4  # buffer shapes a MemLong keeps (e.g. answers of other lengths); the oldest is dropped beyond
_POOL_LOCK = threading.Lock()  # concurrent calls (adapters' worker threads) take and give back buffers


class StaticKV:
    """One decode call's K-V: per layer ``(1, Hkv, slots, D)`` buffers, ``[prefix | tokens | free]``.

    Args:
        ctx: the call's context (``ml.context(memory)``, a prefix in every layer); its prefix is copied into the
            buffers and dropped.
        tokens: slots for the tokens after the prefix (prompt + new tokens); lengths are rounded up to ``_BUCKET``.
        pool: the compiled step's buffers: taken from this pool of the model's finished calls (:meth:`release`
            gives them back), and attended whole with a mask (fixed shapes); without one, each forward attends to the
            slots written so far with the dynamic path's kernels (:func:`memlong.attention.joint_attention`).

    ``advance(n)`` places the next forward's ``n`` tokens after those written so far; the attention call of each
    layer (``ctx.static``) writes their K-V there and attends. Layers with one prefix length and buffer length
    (retrieval layers, the others) form a group and share the slots and mask.
    """

    def __init__(self, ctx: AttentionContext, tokens: int, *, dtype: torch.dtype, device: torch.device,
                 shape: tuple[int, int], pool: dict[tuple, dict[str, dict]] | None = None) -> None:
        # layer -> (prefix length, buffer length): the slot of its first token, and its slots
        self.group = {layer: (int(k.shape[2]), -(-(int(k.shape[2]) + tokens) // _BUCKET) * _BUCKET)
                      for layer, (k, _) in ctx.prefix.items()}
        groups = sorted(set(self.group.values()))  # layer -> its group's number: what the compiled step reads, so
        self.gid = {layer: groups.index(group) for layer, group in self.group.items()}  # prefixes never recompile it
        self.tokens, self.written, self.device, self.backend = tokens, 0, device, ctx.backend
        self.masked, self._pool = pool is not None, pool
        self._key = (str(device), dtype, shape, tuple((layer, self.gid[layer], group[1])
                                                      for layer, group in sorted(self.group.items())))
        with _POOL_LOCK:
            free = pool.pop(self._key, None) if pool is not None else None
        self.buffers = free or self._allocate(dtype, shape)
        for layer, (k, v) in ctx.prefix.items():
            self.buffers["keys"][layer][:, :, :k.shape[2]] = k
            self.buffers["values"][layer][:, :, :v.shape[2]] = v
        self.keys, self.values = self.buffers["keys"], self.buffers["values"]
        self.slots: dict[int, torch.Tensor] = {}  # group number -> this forward's slots (T,)
        self.masks: dict[int, torch.Tensor] = {}  # group number -> (T, length), masked (compiled) only
        self._positions = {g: torch.arange(group[1], device=device)[None, :]  # (1, length): slot numbers
                           for g, group in enumerate(groups)} if self.masked else {}
        ctx.prefix = {}

    def _allocate(self, dtype: torch.dtype, shape: tuple[int, int]) -> dict[str, dict]:
        heads, dim = shape
        new = {name: {} for name in ("keys", "values", "slot1", "mask1")}  # slot1/mask1: one-token forwards, per group
        for layer, group in self.group.items():
            for name in ("keys", "values"):
                # the masked step reads every slot (zero weight on the free ones: they must be finite); the unmasked
                # one reads only slots written, so they need no zero fill
                new[name][layer] = (torch.zeros if self.masked else torch.empty)(1, heads, group[1], dim, dtype=dtype,
                                                                                 device=self.device)
            if self.gid[layer] not in new["slot1"]:
                new["slot1"][self.gid[layer]] = torch.zeros(1, dtype=torch.long, device=self.device)
                new["mask1"][self.gid[layer]] = torch.zeros(1, group[1], dtype=torch.bool, device=self.device)
        if self.device.type == "cuda":  # a CUDA graph reads and writes them where they are: no copy per replay
            for store in new.values():
                for t in store.values():
                    torch._dynamo.mark_static_address(t)
        return new

    def advance(self, n: int) -> None:
        """Place the next forward's ``n`` tokens after the ``written`` ones, in every group's slots. One-token
        forwards reuse the same slot and mask tensors, updated in place (what a compiled step reads)."""
        if self.written + n > self.tokens:
            raise ValueError(f"the decode buffer holds {self.tokens} tokens after the prefix; "
                             f"{self.written + n} asked.")
        for group, g in {self.group[layer]: g for layer, g in self.gid.items()}.items():
            first = group[0] + self.written
            if n == 1:  # one kernel each, no new tensors: the decode step's per-token bookkeeping
                self.slots[g] = self.buffers["slot1"][g].fill_(first)
                if self.masked:
                    self.masks[g] = torch.le(self._positions[g], first, out=self.buffers["mask1"][g])
                continue
            self.slots[g] = slots = torch.arange(first, first + n, device=self.device)
            if self.masked:
                self.masks[g] = self._positions[g] <= slots[:, None]
        self.written += n

    def release(self) -> None:
        """The call is over: its buffers go back to the model's pool (compiled calls only), newest shape last; the
        pool keeps :data:`_POOL_SHAPES` shapes."""
        if self._pool is not None and self.buffers is not None:
            with _POOL_LOCK:
                self._pool.pop(self._key, None)
                self._pool[self._key] = self.buffers  # one set per shape: the newest
                while len(self._pool) > _POOL_SHAPES:  # (a shape dropped and met again is a new CUDA graph recording)
                    del self._pool[next(iter(self._pool))]
        self.buffers = None

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Write ``key``/``value`` ``(1, Hkv, T, D)`` at this forward's slots and attend over the buffer;
        returns ``(1, H, T, D)``."""
        g = self.gid[layer]
        keys, values, slots = self.keys[layer], self.values[layer], self.slots[g]
        keys.index_copy_(2, slots, key.to(keys.dtype))
        values.index_copy_(2, slots, value.to(values.dtype))
        if not self.masked:
            end = self.group[layer][0] + self.written
            return joint_attention(query, keys[:, :, :end].to(query.dtype), values[:, :, :end].to(query.dtype),
                                   end - query.shape[2], scaling, self.backend)
        return F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype),
                                              attn_mask=self.masks[g], scale=scaling,
                                              enable_gqa=query.shape[1] != keys.shape[1])


def start_static(ml: MemLong, ctx: AttentionContext, tokens: int) -> StaticKV | None:
    """Move ``ctx`` to static buffers for ``tokens`` tokens after its prefix (``None``: it stays dynamic: APE)."""
    if ctx.ape is not None:
        return None
    missing = [layer for layer in range(ml.num_layers) if layer not in ctx.prefix]
    if missing:  # no sink and no memory in some layers: a zero-width prefix keeps one code path
        empty = torch.zeros(1, ml.kv_heads, 0, ml.head_dim, dtype=ml.dtype, device=ml.device)
        ctx.prefix.update(dict.fromkeys(missing, (empty, empty)))
    pool = _POOLS.setdefault(ml, {}) if ml.config.decode_mode == "compiled" else None
    ctx.static = StaticKV(ctx, tokens, dtype=ml.dtype, device=ml.device, shape=(ml.kv_heads, ml.head_dim), pool=pool)
    ctx.grow = False
    return ctx.static


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # MemLong -> its compiled decoder


def compiled_decoder(ml: MemLong):
    """``ml.decoder`` compiled with ``torch.compile`` (on CUDA ``mode="reduce-overhead"``: each call replayed as CUDA
    graphs, not launched kernel by kernel), for the two fixed-shape calls that use it:

    * streaming steps (``MemLongConfig.stream_compile``): only full steps that read no memory (``Stream.step``); they
      have one shape once the local cache is full (``step_size`` tokens over sink + cache), so a corpus compiles
      twice: the first step of a document and the steady state; its last, shorter step runs eagerly;
    * one-token decode steps (``decode_mode="compiled"``, :func:`compiled_step`): one compilation per buffer size.

    Captured K-V leave the compiled region through ``ctx.pending`` and are joined outside it (``finish_capture``),
    and logits are computed from its output at once, so no output of one replay is read after the next."""
    if ml not in _DECODERS:
        _DECODERS[ml] = torch.compile(ml.decoder, mode="reduce-overhead" if ml.device.type == "cuda" else None,
                                      dynamic=False)
    return _DECODERS[ml]


def compiled_step(ml: MemLong, token: int, position: int, ctx: AttentionContext) -> torch.Tensor:
    """Logits ``(1, 1, V)`` of one token at ``position`` through :func:`compiled_decoder` (``decode_mode="compiled"``):
    its inputs (token, position, the buffers reached through ``ctx``) change, their shapes do not, so nothing
    recompiles between steps or calls of one buffer size (tests/test_static_decode.py counts the compilations)."""
    hidden = compiled_decoder(ml)(input_ids=torch.tensor([[token]], device=ml.device),
                                  position_ids=torch.tensor([[position]], device=ml.device), use_cache=False,
                                  memlong_context=ctx).last_hidden_state
    return ml.model.lm_head(hidden).float()
