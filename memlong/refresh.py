"""``kv_refresh``: re-encode part of the retrieved K-V next to the chunks retrieved with them.

Stored chunk K-V never saw the chunks retrieved with them (each was computed in its own document window, or
alone). Like CacheBlend (Yao et al., 2025), :func:`refresh` runs all retrieved tokens through layers
``0..probe_layer`` in their retrieved order (a small share of a full encode), ranks tokens by how far their keys
there lie from the stored ones, and runs the top ``share`` through every layer, each attending to the retrieved
K-V before it (refreshed ones included). Their fresh K-V replace the stored ones for this answer only; the bank
is not changed. ``share=1`` computes exactly what encoding the retrieved tokens as text would.

``head=n`` (``MemLongConfig.kv_reencode_head``, EPIC / LegoLink, arXiv 2410.15332) also re-encodes the first ``n``
tokens of every retrieved chunk, where a chunk encoded alone carries the attention a sequence start draws; the
``share`` is then ranked among the other tokens. Both select slots; one pass re-encodes them all.

This is also the home for other ways of reading several independently encoded chunks (the parallel-encoding
options of DESIGN.md section 5).

Example:
    >>> memory = ml.memory_for(chunk_ids, "docs")
    >>> fresh, n = refresh(ml, memory, chunk_ids, "docs", share=0.25)   # or ml.refresh(...)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from memlong.attention import Blend, finish_capture
from memlong.loading import check_memory
from memlong.positions import Memory

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["chunk_tokens", "refresh"]


class _Stop(Exception):
    """Raised by a forward hook to end a forward after the layer it is registered on."""


def _stop(module, args, output):
    raise _Stop


def chunk_tokens(ml: MemLong, chunk: Any) -> list[int] | None:
    """Token ids behind a chunk's K-V: the recorded ones, else its text re-tokenized when that gives as many
    tokens (banks saved before ids were recorded); ``None`` when neither is known.

    Raises:
        ValueError: recorded ids beyond this model's vocabulary (the chunk was stored by another model).
    """
    if chunk.tokens is not None:
        ids = list(chunk.tokens)
    else:
        ids = ml.tokenize(chunk.text)
        if len(ids) != chunk.n_tokens:
            return None
    vocab = ml.model.get_input_embeddings().num_embeddings
    if any(t >= vocab for t in ids):
        raise ValueError(f"Chunk {chunk.id} holds token ids beyond this model's vocabulary ({vocab}): it was "
                         "stored by another model. Use the model that built the bank or a fresh namespace.")
    return ids


def _retrieved_tokens(ml: MemLong, chunk_ids: Sequence[str], namespace: str,
                      head: int = 0) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Token ids of the retrieved chunks in document order (0 where unknown), which of them are known, and which
    are among the first ``head`` tokens of their chunk."""
    bank = ml.bank
    chunks = sorted((bank.get(c, namespace=namespace) for c in dict.fromkeys(chunk_ids)), key=lambda c: c.order)
    ids: list[int] = []
    known: list[bool] = []
    heads: list[bool] = []
    for c in chunks:
        toks = chunk_tokens(ml, c)
        ids += toks if toks is not None else [0] * c.n_tokens
        known += [toks is not None] * c.n_tokens
        heads += [i < head for i in range(c.n_tokens)]
    return ids, torch.tensor(known, device=ml.device), torch.tensor(heads, device=ml.device) & torch.tensor(
        known, device=ml.device)


def _rank(ml: MemLong, ids: torch.Tensor, keys: torch.Tensor, known: torch.Tensor, n: int,
          probe_layer: int) -> torch.Tensor:
    """Slots of the ``n`` ``known`` tokens whose probe-layer keys deviate most from the stored ones, sorted."""
    m = ids.shape[0]
    ctx, pos = ml.context(capture=True)
    hook = ml.decoder.layers[probe_layer].register_forward_hook(_stop)
    try:
        ml.run(ids, positions=torch.arange(m) + pos, context=ctx, logits_for=None)
    except _Stop:
        finish_capture(ctx)  # the layers up to the probe ran
    finally:
        hook.remove()
    fresh = ctx.captured[probe_layer][0][0].float()  # (Hkv, M, D)
    stale = keys[ml.config.source_index(probe_layer)].to(fresh.device).float()
    deviation = (fresh - stale).norm(dim=-1).sum(0).masked_fill(~known, float("-inf"))  # (M,)
    return deviation.topk(n).indices.sort().values


def _check_amounts(share: Any, head: Any) -> None:
    """ValueError unless ``share`` is a number in [0, 1] and ``head`` a token count >= 0 (the config caps
    ``kv_reencode_head`` at 32; a direct call may re-encode whole chunks). A share of -1 failed as 'no token ids to
    run'; 2 and head=-1 passed silently."""
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 <= share <= 1:
        raise ValueError(f"share must be a number in [0, 1] (the share of retrieved tokens to re-encode), got {share!r}.")
    if isinstance(head, bool) or not isinstance(head, numbers.Integral) or head < 0:
        raise ValueError(f"head must be an integer token count >= 0 (tokens re-encoded at each chunk's start), "
                         f"got {head!r}.")


@torch.no_grad()  # what it computes is read as stored memory (refresh outside no_grad built an autograd graph)
def refresh(ml: MemLong, memory: Memory, chunk_ids: Sequence[str], namespace: str, share: float,
            probe_layer: int = 1, head: int = 0) -> tuple[Memory, int]:
    """Re-encode the first ``head`` tokens of every chunk and the ``share`` of the other retrieved tokens whose
    stored K-V differ most (see module docstring).

    Args:
        ml: the model (``kv_source="per_layer"``, every layer a retrieval layer, ``continual`` layout).
        memory: the retrieved K-V, ``ml.memory_for(chunk_ids, namespace)``.
        chunk_ids: the retrieved chunks.
        namespace: their namespace.
        share: in ``[0, 1]``; ``1`` re-encodes every retrieved token whose ids are known.
        probe_layer: the layer whose keys rank the tokens.
        head: tokens re-encoded at the start of every chunk (``kv_reencode_head``), on top of the share.

    Returns:
        The refreshed memory (a copy; the bank is unchanged) and the number of tokens re-encoded.
    """
    _check_amounts(share, head)
    if memory is None:  # (check_memory lets None through: no memory is valid elsewhere)
        raise TypeError("memory must be the (keys, values) that ml.memory_for(chunk_ids, namespace) returns, got None.")
    check_memory(ml, memory)
    keys, values = memory
    ids, known, heads = _retrieved_tokens(ml, chunk_ids, namespace, head)
    if keys.shape[2] != len(ids):
        raise ValueError(f"memory holds {keys.shape[2]} tokens but chunk_ids {len(ids)}: pass the memory of these "
                         "chunk ids, ml.memory_for(chunk_ids, namespace).")
    rest = known & ~heads
    m, n_rest = len(ids), int(rest.sum())
    n = min(math.ceil(share * m), n_rest)
    if n == 0 and not heads.any():
        return memory, 0
    ids_t = torch.tensor(ids, device=ml.device)
    # with every remaining known token refreshed no ranking is needed
    ranked = _rank(ml, ids_t, keys, rest, n, probe_layer) if 0 < n < n_rest else rest.nonzero().view(-1)[:n]
    slots = torch.cat([heads.nonzero().view(-1), ranked]).sort().values
    ctx, pos = ml.context(memory, capture=True)
    # each layer's prefix is [memory (positions pos-m .. pos-1) | sink (position 0)]
    key_pos = torch.arange(m, device=ml.device) + pos - m
    if ml.sink_ids:
        key_pos = torch.cat([key_pos, torch.zeros(1, dtype=torch.long, device=ml.device)])
    query_pos = key_pos[slots]
    ctx.blend = Blend(slots=slots, visible=key_pos[None, :] <= query_pos[:, None])
    ml.run(ids_t[slots], positions=query_pos, context=ctx, logits_for=None)
    keys, values = keys.clone(), values.clone()
    for i, layer in enumerate(ml.config.source_layers):
        keys[i][:, slots] = ctx.captured[layer][0][0].to(keys.dtype)
        values[i][:, slots] = ctx.captured[layer][1][0].to(values.dtype)
    return (keys, values), int(slots.numel())
