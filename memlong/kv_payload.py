"""One chunk's stored K-V (its *payload*): dense floating point, or int8 in the KIVI layout.

Contract:
    * A payload holds the keys (before RoPE) and values of one chunk, ``(n_source_layers, n_kv_heads, tokens,
      head_dim)``, and gives them back with :meth:`keys` / :meth:`values` in the bank's floating dtype.
    * :class:`DenseKV` returns its tensors as stored (exact). :class:`Int8KV` stores ``uint8`` codes with an
      asymmetric scale and minimum per *channel* for keys (over the chunk's tokens) and per *token* for values
      (over the head dimension) -- the KIVI layout (Liu et al., 2024: key outliers sit in fixed channels, value
      errors stay per token) -- and dequantizes on every read: ``x ~= code * scale + min``, an error of at most
      half a step (``(max - min) / 510``) per element.
    * :meth:`named` lists the tensors to write (suffix -> tensor), :func:`payload_from` rebuilds a payload from
      them and checks their dtypes and shapes (ValueError naming the problem). The tensors may be memory-mapped
      views of a file (:mod:`memlong.kv_store`): payloads never write to them.

Example:
    >>> kv = encode(torch.randn(2, 3, 128, 64), torch.randn(2, 3, 128, 64), "int8", torch.float16)
    >>> kv.keys().shape, kv.nbytes < 2 * 2 * 3 * 128 * 64 * 2
    (torch.Size([2, 3, 128, 64]), True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

__all__ = ["QUANTIZATIONS", "DenseKV", "Int8KV", "KVPayload", "Quantization", "check_quantization", "encode",
           "payload_from"]

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


def check_quantization(value: object) -> Quantization:
    """``value`` if it names a K-V storage format; ValueError naming the valid ones otherwise."""
    if value not in QUANTIZATIONS:
        raise ValueError(f"memory quantization must be 'none' (K-V stored in memory_dtype) or 'int8' (KIVI layout, "
                         f"about half the bytes of float16), got {value!r}.")
    return value  # type: ignore[return-value]


class DenseKV:
    """K-V stored as they are: ``k``, ``v`` of shape ``(layers, kv_heads, tokens, head_dim)``."""

    __slots__ = ("__weakref__", "k", "v")  # weakly referenced by memlong.kv_cache
    kind = "none"

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def keys(self) -> torch.Tensor:
        return self.k

    def values(self) -> torch.Tensor:
        return self.v

    @property
    def shape(self) -> torch.Size:
        return self.k.shape

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def named(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}


class Int8KV:
    """K-V as ``uint8`` codes: keys with a scale/min per channel ``(L, H, 1, D)``, values per token ``(L, H, T, 1)``."""

    __slots__ = ("__weakref__", "dtype", "kq", "km", "ks", "vm", "vq", "vs")
    kind = "int8"

    def __init__(self, kq: torch.Tensor, ks: torch.Tensor, km: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
                 vm: torch.Tensor, dtype: torch.dtype) -> None:
        self.kq, self.ks, self.km, self.vq, self.vs, self.vm, self.dtype = kq, ks, km, vq, vs, vm, dtype

    @staticmethod
    def quantize(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> Int8KV:
        kq, ks, km = _quantize(k, dim=2)  # per channel: statistics over the tokens
        vq, vs, vm = _quantize(v, dim=3)  # per token: statistics over the head dimension
        if not bool(torch.isfinite(ks).all() & torch.isfinite(vs).all()):  # a saved bank would not load again
            raise ValueError("chunk K-V span a range wider than float32 holds (about 3.4e38), so they have no 8-bit "
                             "scale; check the model's outputs, or use a bank without quantization.")
        return Int8KV(kq, ks, km, vq, vs, vm, dtype)

    def keys(self) -> torch.Tensor:
        return (self.kq.float() * self.ks + self.km).to(self.dtype)

    def values(self) -> torch.Tensor:
        return (self.vq.float() * self.vs + self.vm).to(self.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.kq.shape

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.kq, self.ks, self.km, self.vq, self.vs, self.vm))

    def named(self) -> dict[str, torch.Tensor]:
        return {"k": self.kq, "ks": self.ks, "km": self.km, "v": self.vq, "vs": self.vs, "vm": self.vm}


KVPayload = DenseKV | Int8KV


def _quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit codes of ``x`` with one (scale, min) per slice reduced over ``dim`` (float32 scales)."""
    x = x.float()
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)  # a constant slice: any scale decodes it exactly to ``lo``
    codes = torch.round((x - lo) / scale).clamp_(0, 255).to(torch.uint8)
    return codes.contiguous(), scale.contiguous(), lo.contiguous()


def encode(k: torch.Tensor, v: torch.Tensor, quantization: Quantization, dtype: torch.dtype) -> KVPayload:
    """The payload of checked K-V ``k``/``v`` (already in the bank's ``dtype`` and device) for ``quantization``."""
    return DenseKV(k, v) if quantization == "none" else Int8KV.quantize(k, v, dtype)


def payload_from(get: Callable[[str], torch.Tensor | None], dtype: torch.dtype) -> KVPayload:
    """Rebuild a payload from its stored tensors (``get(suffix)``, None when absent); ValueError if malformed.

    ``dtype``: the bank's floating dtype (what an int8 payload dequantizes to; dense K-V keep their own)."""
    k, v = get("k"), get("v")
    if k is None or v is None or k.dtype != v.dtype or k.dim() != 4 or k.shape != v.shape:
        raise ValueError("K-V tensors are missing or malformed.")
    if k.dtype != torch.uint8:
        if get("ks") is not None:
            raise ValueError("floating-point K-V come with int8 scales.")
        return DenseKV(k, v)
    parts = [get(s) for s in ("ks", "km", "vs", "vm")]
    L, H, T, D = k.shape
    want = [(L, H, 1, D), (L, H, 1, D), (L, H, T, 1), (L, H, T, 1)]
    if any(p is None or p.dtype != torch.float32 or tuple(p.shape) != w for p, w in zip(parts, want)):
        raise ValueError("int8 K-V lack float32 scales and minimums of the KIVI shapes.")
    if not all(bool(torch.isfinite(p).all()) for p in parts):  # type: ignore[arg-type]
        raise ValueError("int8 K-V scales hold NaN or infinite values.")
    ks, km, vs, vm = parts
    return Int8KV(k, ks, km, v, vs, vm, dtype)  # type: ignore[arg-type]
