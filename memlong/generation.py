"""Decoding with memory: the one decode loop, its stop handling, per-call statistics and teacher-forced scoring
(``score``; ``segment_forward``, the differentiable one-segment forward behind ``MemLong.forward``).

``generate`` encodes only the prompt: retrieved chunks (by explicit id, or found with the prompt as query) enter
the retrieval layers as stored K-V (with ``kv_refresh``, a share of the retrieved tokens is re-encoded next to
the chunks retrieved with them first, :mod:`memlong.refresh`).

Every generation is a :class:`Generation`: an iterator of text pieces that carries its own
:class:`GenerationStats`, so concurrent calls never share statistics. ``MemLong.last_generation`` still points
at the stats of the most recently *started* call, a convenience that is not thread-safe.

Example:
    >>> g = ml.generate("Who killed Polonius?", namespace="hamlet", stream=True)
    >>> answer = g.text()              # consume the rest; or iterate: for piece in g: ...
    >>> g.stats.prompt_tokens, g.stats.memory_tokens, g.stats.new_tokens
    >>> ml.decode(ids, memory=ml.memory_for(chunk_ids, "hamlet"), max_new_tokens=8).text()
    >>> ml.score(ids, target_ids).mean()           # mean log-probability of target_ids after ids
    >>> ml.forward(torch.tensor([ids]), labels=torch.tensor([ids]), namespace="hamlet")["loss"]
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memlong.positions import Memory
from memlong.records import as_list, check_count, check_namespace, check_string
from memlong.static_kv import compiled_step, start_static

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["Generation", "GenerationStats", "PromptTooLongError", "decode", "encode_prompt", "eos_ids",
           "position_tensor", "retrieve_ids", "score", "segment_forward", "start_generation", "token_tensor", "vocab_rows"]


class PromptTooLongError(ValueError):
    """A prompt longer than the local window (``tokens`` > ``window``): catch it to shorten the prompt, or put its
    long context into memory with ``ingest()``."""

    def __init__(self, message: str, tokens: int, window: int) -> None:
        super().__init__(message)
        self.tokens, self.window = tokens, window


@dataclass
class GenerationStats:
    """What one generation encoded and retrieved (filled in while it runs)."""

    prompt_tokens: int = 0  # tokens the decoder encoded for the prompt (retrieved text: see refreshed_tokens)
    memory_tokens: int = 0  # tokens of retrieved K-V the retrieval layers attended to
    refreshed_tokens: int = 0  # retrieved tokens re-encoded (``kv_refresh``), on top of ``prompt_tokens``
    chunk_ids: list[str] = field(default_factory=list)
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds from the call (retrieval, refresh and prompt included) to the first
    seconds: float = 0.0  # new token, and to the end; a stream's wait before its first ``next`` is not counted
    finish_reason: str = ""  # "stop" (end of sequence or a stop string), "length" (max_new_tokens), "" (closed early)


class Generation(Iterator[str]):
    """One call's answer as it is decoded: iterate for text pieces; ``stats`` belongs to this call only.

    Everything that can fail on the input (prompt, chunk ids) has failed before a ``Generation`` exists; the
    decoder runs lazily, on the first ``next``.
    """

    def __init__(self, pieces: Iterator[str], stats: GenerationStats) -> None:
        self._pieces = pieces
        self.stats = stats

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def __repr__(self) -> str:
        return f"<Generation {self.stats}>"

    def close(self) -> None:
        """Stop decoding now (e.g. a caller's stop string completed); the stats keep what was done so far."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def text(self) -> str:
        """The rest of the answer as one string (consumes the generation)."""
        return "".join(self._pieces)


def eos_ids(ml: MemLong) -> frozenset[int]:
    """Token ids that end an answer: the tokenizer's and generation config's EOS, and ``<|im_end|>``."""
    tokenizer = ml.tokenizer
    eos = {t for t in (tokenizer.eos_token_id,) if t is not None}
    gen_eos = getattr(getattr(ml.model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if "<|im_end|>" in tokenizer.get_vocab():  # chat models' end of turn
        eos.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return frozenset(eos)


def encode_prompt(ml: MemLong, prompt: str, chat: bool = False, answer_prefix: str = "") -> list[int]:
    """Token ids the decoder encodes for ``prompt`` (the leading sink/BOS token is shared, not re-encoded).

    Raises:
        ValueError: an empty prompt; PromptTooLongError (a ValueError): one longer than ``local_window``.
    """
    check_string(prompt, "prompt")
    check_string(answer_prefix, "answer_prefix")
    if not prompt.strip():
        raise ValueError("The prompt is empty: give the model some text to answer.")
    if chat:
        prompt = ml.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
    ids = ml.strip_sink(ml.tokenize(prompt + answer_prefix))
    if len(ids) > ml.config.local_window:
        raise PromptTooLongError(f"The prompt is {len(ids)} tokens, longer than the local window "
                                 f"({ml.config.local_window}). Put long context into memory with ingest() and ask a "
                                 "shorter question, or raise local_window.", len(ids), ml.config.local_window)
    return ids


def _next_token(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy (``temperature`` 0) or sampled next token from the last position's ``scores`` ``(V,)``."""
    if temperature and temperature > 0:
        # shifted by the maximum first: scores / 1e-300 overflowed to inf and softmax gave NaN; now the best token
        # scores 0 and the rest go towards -inf, i.e. greedy in the limit
        probs = torch.softmax((scores.double() - scores.max()) / temperature, -1).cpu()  # float32: 1e-300 is 0
        return int(torch.multinomial(probs, 1, generator=generator))
    return int(scores.argmax())


def check_decoding(max_new_tokens: int, temperature: float, stop: str | Sequence[str] | None,
                   seed: Any = None) -> tuple[str, ...]:
    """The stop strings as a tuple (one string is one stop string, not its characters; ``None``: none), after
    checking the decoding arguments; ValueError / TypeError naming the argument and the fix."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2 ** 63 <= seed < 2 ** 64):  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be 0 (greedy) or a positive finite number, got {temperature!r}.")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    bad = [s for s in stops if not isinstance(s, str)]
    if bad:
        raise TypeError(f"stop must be a string or a list of strings, got {bad[0]!r} in it.")
    return tuple(s for s in dict.fromkeys(stops) if s)


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (text to hold back: the next
    piece may complete the stop string, which is never part of the output, not even in part)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _decode_loop(ml: MemLong, ids: list[int], ctx: Any, pos: int, max_new_tokens: int, temperature: float,
                 seed: int | None, stop: Sequence[str], stats: GenerationStats, t0: float, ready: float) -> Iterator[str]:
    t0 += time.perf_counter() - ready  # the caller's wait before the first ``next`` is not the generation's time
    eos = ml.eos_ids
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    static = None
    try:
        # Grad mode is thread-global: no `with torch.no_grad()` may stay open across a `yield`, or the caller runs with
        # gradients off between pieces (and for good, if the generator is abandoned). Each model call gets its own.
        mode = ml.config.decode_mode
        static = start_static(ml, ctx, len(ids) + max_new_tokens) if mode != "dynamic" else None
        with torch.no_grad():
            if static is not None:
                static.advance(len(ids))
            logits = ml.run(ids, positions=torch.arange(len(ids)) + pos, context=ctx, logits_for=slice(-1, None)).logits
        pos += len(ids)
        out: list[int] = []
        emitted = text = ""
        for _ in range(max_new_tokens):
            token = _next_token(logits[0, -1], temperature, generator)
            if token in eos:
                stats.finish_reason = "stop"
                break
            out.append(token)
            if stats.new_tokens == 0:
                stats.time_to_first_token = time.perf_counter() - t0
            stats.new_tokens += 1
            text = ml.tokenizer.decode(out, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                stats.finish_reason = "stop"
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                return
            safe = len(text) - stop_prefix_len(text, stop)
            if not text.endswith("\ufffd") and safe > len(emitted):  # wait for complete characters
                yield text[len(emitted):safe]
                emitted = text[:safe]
            if len(out) == max_new_tokens:
                stats.finish_reason = "length"
                break
            with torch.no_grad():
                if static is not None:
                    static.advance(1)
                if static is not None and mode == "compiled":
                    logits = compiled_step(ml, token, pos, ctx)
                else:
                    logits = ml.run([token], positions=torch.tensor([pos]), context=ctx,
                                    logits_for=slice(-1, None)).logits
            pos += 1
        if len(text.rstrip("\ufffd")) > len(emitted):  # held back for a stop string that never came (text: all of out)
            yield text.rstrip("\ufffd")[len(emitted):]
    finally:  # also when the caller closes the generator early (an adapter's stop string)
        stats.seconds = time.perf_counter() - t0
        if static is not None:
            static.release()


def decode(ml: MemLong, ids: Sequence[int], memory: Memory | None = None, *, max_new_tokens: int = 64,
           temperature: float = 0.0, seed: int | None = None, stop: str | Sequence[str] = (),
           stats: GenerationStats | None = None, t0: float | None = None) -> Generation:
    """Continue token ids ``ids`` (no sink; it is in the prefix) with ``memory`` in the retrieval layers.

    Args:
        ml: the model.
        ids: the prompt's token ids (``ml.encode_prompt`` or ``ml.strip_sink(ml.tokenize(...))``).
        memory: retrieved K-V (``ml.memory_for``), or ``None``.
        max_new_tokens: generation budget; it ends earlier at an EOS token or a ``stop`` string.
        temperature: 0 = greedy; otherwise sampling with this temperature (``seed`` fixes the draw).
        stop: a string or strings that end generation (not part of the output, not even in part: text that may
            begin one is held back until the next token settles it).
        stats: where to count (default: a fresh :class:`GenerationStats`).
        t0: when the call started (``time.perf_counter()``; default: now), for the timings.
    """
    stop = check_decoding(max_new_tokens, temperature, stop, seed)
    if len(ids) == 0:
        raise ValueError("decode needs at least one prompt token: e.g. ml.encode_prompt(text).")
    ids = token_tensor(ids, "cpu", vocab_rows(ml))[0].tolist()  # checked now, not at the first piece
    max_new_tokens, temperature = int(max_new_tokens), float(temperature)  # numpy scalars too
    seed = None if seed is None else int(seed)
    stats = stats if stats is not None else GenerationStats(prompt_tokens=len(ids), memory_tokens=0 if memory is None
                                                            else int(memory[0].shape[2]))
    t0 = time.perf_counter() if t0 is None else t0
    with torch.no_grad():  # (now: a stream that cannot fit failed at its first next, after the call had returned)
        ctx, pos = ml.context(memory, grow=True)
    if pos + len(ids) + max_new_tokens > ml.max_positions:
        raise ValueError(f"Prompt + memory + max_new_tokens need {pos + len(ids) + max_new_tokens} positions; "
                         f"the model has {ml.max_positions}. Lower max_new_tokens or top_k.")
    loop = _decode_loop(ml, list(ids), ctx, pos, max_new_tokens, temperature, seed, stop, stats, t0,
                        time.perf_counter())
    return Generation(loop, stats)


def position_tensor(positions: Sequence[int] | torch.Tensor, count: int, device: torch.device | str) -> torch.Tensor:
    """``positions`` as a ``(1, count)`` tensor on ``device``: one integer position per token (rotary embedding
    fails later, unclearly, on another number)."""
    t = torch.as_tensor(positions)
    if t.numel() != count or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"positions must hold one integer position per token ({count}), got shape {tuple(t.shape)} "
                         f"of {t.dtype}; leave positions out to place the tokens right after the memory prefix.")
    return t.reshape(1, -1).to(device)


def token_tensor(ids: Sequence[int] | torch.Tensor, device: torch.device | str, vocab: int | None = None
                 ) -> torch.Tensor:
    """``ids`` as a ``(1, T)`` long tensor on ``device``, checked (torch fails later, unclearly): at least one id,
    integers, one sequence (``(T,)`` or ``(1, T)``), each in ``0..vocab - 1`` when ``vocab`` (the embedding's rows,
    :func:`vocab_rows`) is given. TypeError for text or non-integers, ValueError for the rest, naming the problem."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"Token ids expected, got text {ids[:40]!r}: tokenize it first (ml.encode_prompt(text), "
                        "ml.tokenize(text)).")
    try:
        ids_t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"Token ids must be a list of integers or an integer tensor ({exc}).") from None
    if ids_t.dim() == 0:
        raise TypeError(f"Token ids must be a list of integers or an integer tensor, got one {type(ids).__name__}: "
                        "wrap it in a list.")
    if ids_t.numel() == 0:
        raise ValueError("No token ids to run (an empty prompt, step or document?); give at least one token.")
    if ids_t.is_floating_point() or ids_t.is_complex() or ids_t.dtype == torch.bool:
        raise TypeError(f"Token ids must be integers, got {ids_t.dtype} values; pass the tokenizer's ids.")
    if ids_t.dim() > 1 and ids_t.shape[:-1].numel() != 1:
        raise ValueError(f"Token ids of shape {tuple(ids_t.shape)} are a batch of sequences: MemLong runs one "
                         "sequence at a time ((T,) or (1, T)); run each sequence in its own call.")
    ids_t = ids_t.to(torch.long)  # (min/max are not implemented for every integer dtype, e.g. numpy's uint16)
    lo, hi = (int(x) for x in torch.aminmax(ids_t))  # one reduction: this runs for every decoded token
    if vocab is not None and (lo < 0 or hi >= vocab):
        raise ValueError(f"Token id {lo if lo < 0 else hi} is outside the vocabulary 0..{vocab - 1}: pass ids from "
                         "this model's tokenizer.")
    return ids_t.to(device).view(1, -1)


def vocab_rows(ml: MemLong) -> int:
    """Rows of the model's token embedding: the token ids it can run are ``0..vocab_rows(ml) - 1``."""
    return int(ml.model.get_input_embeddings().num_embeddings)


def score(ml: MemLong, ids: Sequence[int], target: Sequence[int], memory: Memory | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities ``(len(target),)`` of ``target`` following ``ids``, with ``memory``; each a
    list of token ids or a ``(T,)`` / ``(1, T)`` tensor, checked as :func:`token_tensor` checks them."""
    if _count(ids) == 0:
        raise ValueError("score needs at least one token before the target (the first target token's logits come "
                         "from it): e.g. ml.encode_prompt(text).")
    vocab = vocab_rows(ml)
    ids = token_tensor(ids, "cpu", vocab)[0].tolist()  # a (1, T) tensor made a confusing TypeError
    target = [] if _count(target) == 0 else token_tensor(target, "cpu", vocab)[0].tolist()
    seq = ids + target
    with torch.no_grad():
        logits = ml.run(seq, memory=memory, logits_for=slice(len(ids) - 1, len(seq) - 1)).logits  # (1, |target|, V)
        target_t = torch.as_tensor(target, device=logits.device)
        return torch.log_softmax(logits[0], -1).gather(1, target_t[:, None])[:, 0]


def _count(ids: Any) -> int | None:
    """How many token ids ``ids`` holds, when that is known without converting it."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.numel() if isinstance(ids, torch.Tensor) else ids.size
    return len(ids) if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)) else None


def segment_forward(ml: MemLong, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                    namespace: str = "default", chunk_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """One segment with retrieved memory, differentiable; see :meth:`memlong.MemLong.forward` (which calls this).

    Memory: ``chunk_ids`` if given, else the namespace's ``top_k`` chunks found (dense search) with the most
    recently stored chunk's text as the query (the segment's own tokens are never the query).
    """
    ids = token_tensor(input_ids, "cpu", vocab_rows(ml))[0].tolist()  # one sequence: a (2, T) batch is refused
    if labels is not None:
        labels = _check_labels(labels, len(ids), vocab_rows(ml))
    if len(ids) > ml.config.local_window:
        raise ValueError(f"Segment of {len(ids)} tokens exceeds local_window {ml.config.local_window}.")
    with ml.bank.reading():  # what the search finds is still there when it is read (another thread may delete)
        if chunk_ids is None and ml.config.top_k > 0:
            stored = ml.bank.chunk_ids(namespace)
            if stored:
                query = ml.bank.get(stored[-1], namespace=namespace).text
                chunk_ids = [h.chunk_id for h in ml.bank.search(query, namespace=namespace, k=ml.config.top_k,
                                                                mode="dense")]
        memory = ml.memory_for([] if chunk_ids is None else chunk_ids, namespace)
    logits = ml.run(ids, memory=memory).logits  # (1, T, V)
    out = {"logits": logits}
    if labels is not None:  # shifted here, as in transformers
        out["loss"] = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels.view(-1)[1:].to(logits.device), ignore_index=-100)
    return out


def _check_labels(labels: Any, n: int, vocab: int) -> torch.Tensor:
    """``labels`` as int64 (what cross_entropy takes), or ValueError naming what is wrong with a segment's labels:
    (1, n) or (n,) integer token ids or -100."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids (-100 = ignore), got {type(labels).__name__}"
                         f"{'' if not isinstance(labels, torch.Tensor) else ' of ' + str(labels.dtype)}.")
    if tuple(labels.shape) not in ((n,), (1, n)):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the segment's {n} tokens; give "
                         f"(1, {n}) labels (-100 = ignore).")
    labels = labels.long()  # int32 failed in cross_entropy, and uint8 / int16 wrapped the vocabulary size below
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab))]
    if bad.numel():
        raise ValueError(f"label {int(bad[0])} is not a token id of this model (0..{vocab - 1}) nor -100 (ignore).")
    return labels


def retrieve_ids(ml: MemLong, query: str, namespace: str, k: int | None = None) -> list[str]:
    """The chunk ids an answer reads for ``query``: the namespace's ``k`` (default ``config.top_k``) best hits and,
    with ``config.retrieve_next = n``, the ``n`` chunks that continue each hit in its document (a fact cut by a
    chunk boundary). ``[]`` for no namespace or ``k = 0``.

    Example:
        >>> retrieve_ids(ml, "Who killed Polonius?", "hamlet")     # what ml.generate(...) would read
    """
    k = ml.config.top_k if k is None else check_count(k, "k")  # (a negative k read no memory, silently)
    if k <= 0 or check_namespace(namespace) not in ml.bank.namespaces():  # None or "": an error, not no memory
        return []
    ids = [h.chunk_id for h in ml.bank.search(query, namespace=namespace, k=k)]
    return ml.bank.following(ids, namespace=namespace, n=ml.config.retrieve_next) if ml.config.retrieve_next else ids


def start_generation(ml: MemLong, prompt: str, *, namespace: str = "default", chunk_ids: Sequence[str] | None = None,
                     max_new_tokens: int = 64, chat: bool = False, retrieve: bool = True, query: str | None = None,
                     answer_prefix: str = "", temperature: float = 0.0, seed: int | None = None,
                     stop: str | Sequence[str] = ()) -> Generation:
    """The body of :meth:`memlong.MemLong.generate`: encode the prompt, retrieve (and refresh) memory eagerly;
    return the lazily decoded :class:`Generation`. Only the prompt is encoded.

    Args:
        prompt: the text to continue (with ``chat=True``: a user message wrapped in the chat template).
        namespace: memory namespace to read.
        chunk_ids: explicit chunks to attend to (document order is restored); skips retrieval.
        max_new_tokens: generation budget.
        retrieve: with no ``chunk_ids``, search the namespace with ``query`` (default: the prompt).
        answer_prefix: text the answer starts with (prefilled after the prompt, not repeated in the output),
            e.g. ``"The pass key is"``; small models answer far better when the answer's form is forced.
        temperature: 0 = greedy; otherwise sampling with this temperature.
        stop: strings that end generation (not included in the output).

    With ``config.retrieve_next = n`` the ``n`` chunks that follow each retrieved one in its document are read
    too (``stats.chunk_ids`` lists them after their hit). With ``config.kv_refresh = r > 0`` the share ``r`` of the
    retrieved tokens is re-encoded first, next to the chunks retrieved with them (:meth:`MemLong.refresh`; counted
    in ``stats.refreshed_tokens``).
    ``MemLong.generate(..., stream=False)`` returns ``Generation.text()``; ``stream=True`` this object.

    Raises:
        ValueError: an empty prompt; :class:`PromptTooLongError` (a ValueError): longer than ``local_window``.
        memlong.memory.UnknownChunkError: a chunk id not in ``namespace``.

    Example:
        >>> g = start_generation(ml, "Who killed Polonius?", namespace="hamlet")  # ml.generate(..., stream=True)
        >>> answer, stats = g.text(), g.stats    # (ml.generate also sets ml.last_generation; this does not)
    """
    t0 = time.perf_counter()
    stop = check_decoding(max_new_tokens, temperature, stop, seed)  # before any work
    ids = encode_prompt(ml, prompt, chat, answer_prefix)
    if query is not None:
        check_string(query, "query")
    with ml.bank.reading():  # what the search finds is still there when it is read (another thread may delete)
        if chunk_ids is None and retrieve:
            chunk_ids = retrieve_ids(ml, query or prompt, namespace)
        chunk_ids = [] if chunk_ids is None else as_list(chunk_ids, "chunk_ids")
        memory = ml.memory_for(chunk_ids, namespace)  # raises UnknownChunkError before any work
        refreshed = 0
        if memory is not None and (ml.config.kv_refresh > 0 or ml.config.kv_reencode_head > 0):
            with torch.no_grad():
                memory, refreshed = ml.refresh(memory, chunk_ids, namespace)
    stats = GenerationStats(prompt_tokens=len(ids), chunk_ids=list(dict.fromkeys(chunk_ids)), refreshed_tokens=refreshed,
                            memory_tokens=0 if memory is None else int(memory[0].shape[2]))
    return decode(ml, ids, memory, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop,
                  stats=stats, t0=t0)
