"""The optimisation loop behind :func:`memlong.train.train`: documents' segments in, optimizer steps and
resumable checkpoints out.

Named steps, each a method of :class:`Trainer` (one run's optimisation state):

* ``__init__``: AdamW and the warm-up + cosine schedule over ``total_steps``;
* :meth:`Trainer.resume`: trainable weights, optimizer, schedule, counters and data position from a checkpoint;
* :meth:`Trainer.run`: every epoch's seeded document order from the resume position on; per document
  (``_document``) memory is reset and the document streamed segment by segment through ``ml.stream(...).step``
  (``_train_segment``: loss + backward; a resumed document's earlier segments are re-streamed without gradients);
  every ``grad_accum`` segments ``_optimizer_step`` (clip, step, log the mean loss, stop on ``max_steps`` /
  ``max_seconds``) and, every ``save_every`` steps and at the end, ``_save`` (a checkpoint);
* :meth:`Trainer.finish`: the adapter's tensors, with the trained weights merged into the model and frozen.

The model-side helpers are functions: :func:`prepare_parameters` (freeze all, make the upper layers trainable),
:func:`planned_steps`, :func:`segments`, :func:`autocast`, :func:`set_checkpointing`.

Example:
    >>> from memlong.train import TrainResult, trainable_layers
    >>> params = prepare_parameters(ml, config, trainable_layers(ml))
    >>> trainer = Trainer(ml, config, params, TrainResult(adapter_path="runs/x"), total_steps=100,
    ...                   out=Path("runs/x"), identity=identity)
    >>> trainer.run([("hamlet", ml.tokenize(text))])
    >>> tensors = trainer.finish()
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import resource
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memlong.adapter import add_lora, lora_state_dict, merge_lora
from memlong.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from memlong.model import MemLong
    from memlong.streaming import Stream
    from memlong.train import TrainConfig, TrainResult

__all__ = ["COUNTERS", "Trainer", "autocast", "planned_steps", "prepare_parameters", "segments", "set_checkpointing"]

# TrainResult counters carried in a checkpoint (the whole run's totals, resumed parts included)
COUNTERS = ("segments", "segments_with_memory", "tokens", "seconds", "peak_rss_mb", "peak_device_mb")


def prepare_parameters(ml: MemLong, cfg: TrainConfig, layers: Sequence[int]) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then make ``layers`` trainable (LoRA or full); returns ``{name: parameter}``.

    Raises:
        ValueError: ``method="full"`` on a bfloat16 or float16 model: the optimizer would update the half-precision
            weights themselves, and every change below half a step of a weight's 8 or 11 bits rounds to nothing
            (0 % of the norm weights and 60-80 % of the projection elements kept their values after a step).
    """
    if cfg.method == "full" and ml.dtype in (torch.bfloat16, torch.float16):
        raise ValueError(f"method='full' trains the {ml.dtype} weights in place, which rounds most updates away; "
                         "load the model in float32 (MemLong.from_pretrained(..., dtype=torch.float32); training "
                         "still runs under bf16 autocast on a GPU, precision='auto'), or use method='lora' (its "
                         "factors are float32).")
    for p in ml.model.parameters():
        p.requires_grad_(False)
    if cfg.method == "lora":
        add_lora(ml.model, layers, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
        params = {n: p for n, p in ml.model.named_parameters() if ".lora_" in n}
    else:
        prefixes = tuple(f"model.layers.{i}." for i in layers)
        params = {n: p for n, p in ml.model.named_parameters() if n.startswith(prefixes)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def segments(tokens: list[int], step: int) -> list[tuple[list[int], list[int]]]:
    """(segment, targets) pairs; the targets are the next tokens (the last segment has one fewer)."""
    return [(tokens[s:s + step], tokens[s + 1:s + step + 1]) for s in range(0, len(tokens) - 1, step)]


def planned_steps(cfg: TrainConfig, encoded: Sequence[list[int]], step: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` passes of ``grad_accum`` segments each."""
    per_epoch = sum(len(segments(t, step)) for t in encoded)
    return cfg.max_steps or max(1, (per_epoch * cfg.epochs) // cfg.grad_accum)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup_steps``, then cosine down to 10 %."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def autocast(ml: MemLong, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when ``precision`` asks for it (``"auto"``: a CUDA device that supports bf16)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ml.device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    if bf16 and ml.dtype != torch.bfloat16:
        return torch.autocast(device_type=ml.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_checkpointing(model: Any, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, under either name transformers uses."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: ru_maxrss in KiB


class Trainer:
    """One training run's optimisation state: parameters, optimizer, schedule, counters (``result``) and the
    position in the data, stepped through documents' segments.

    Args:
        ml: the model (its upper layers made trainable by :func:`prepare_parameters`).
        config: the run's :class:`~memlong.train.TrainConfig`.
        params: ``{name: parameter}`` to optimise.
        result: the :class:`~memlong.train.TrainResult` whose counters and losses the run updates.
        total_steps: optimizer steps of the whole run (:func:`planned_steps`).
        out: the folder checkpoints go to.
        identity: what a checkpoint must match to be resumed (saved in each checkpoint).
    """

    def __init__(self, ml: MemLong, config: TrainConfig, params: dict[str, torch.nn.Parameter], result: TrainResult,
                 *, total_steps: int, out: Path, identity: dict[str, Any]) -> None:
        self.ml, self.config, self.params, self.result = ml, config, params, result
        self.total_steps, self.out, self.identity = total_steps, out, identity
        self.optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, total_steps))
        self.position = (0, 0, 0)  # (epoch, document index in the epoch's order, segment index): next to train
        self._micro, self._window_loss, self._window_n = 0, 0.0, 0  # segments so far; loss since the last step
        self._t0 = self._call_start = self._restream = 0.0  # clocks of this call; restream: not training time
        self._done = False
        self._bar: Any = None
        # (next position, counters) right after the last step, when it is not checkpointed: what Ctrl-C saves
        self._unsaved: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint (:func:`memlong.checkpoint.load_checkpoint`) of this run."""
        with torch.no_grad():
            for name, value in ckpt["params"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        result = self.result
        result.steps = result.resumed_from_step = ckpt["step"]
        result.losses = list(ckpt["losses"])
        for key in COUNTERS:
            setattr(result, key, ckpt.get("counters", {}).get(key, getattr(result, key)))
        self.position = tuple(ckpt["position"])

    def run(self, documents: Sequence[tuple[str, list[int]]]) -> None:
        """Train on ``(name, tokens)`` documents from :attr:`position` until ``total_steps`` optimizer steps, or
        the first step after ``max_seconds``; the model is left in eval mode, its scratch memory removed. A
        ``KeyboardInterrupt`` (Ctrl-C) first checkpoints the last finished optimizer step, then propagates."""
        from tqdm.auto import tqdm

        ml, cfg, result = self.ml, self.config, self.result
        if cfg.gradient_checkpointing:
            set_checkpointing(ml.model, True)
        ml.model.train()  # no dropout in Llama-family models; needed for gradient checkpointing
        namespace = f"_train-{secrets.token_hex(8)}"
        self._bar = tqdm(total=self.total_steps, initial=result.steps, desc="train", unit="step",
                         disable=not cfg.progress)
        self._t0 = time.perf_counter() - result.seconds  # result.seconds: training time of earlier (resumed) calls
        self._call_start = time.perf_counter()
        self._done = result.steps >= self.total_steps
        try:
            for epoch, d, doc in self._schedule(len(documents)):
                if self._done:
                    break
                self._document(namespace, (epoch, d), *documents[doc])
        except KeyboardInterrupt:  # Ctrl-C: keep the steps since the last checkpoint (a rerun resumes from here)
            if self._unsaved is not None:
                self._save(*self._unsaved)
            raise
        finally:
            self._bar.close()
            ml.bank.reset(namespace)
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.gradient_checkpointing:
                set_checkpointing(ml.model, False)
            ml.model.eval()

    def finish(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (LoRA factors, or the trained layers' weights); ``ml`` keeps the trained weights
        (LoRA merged in), frozen. Records peak memory in ``result``."""
        ml, result = self.ml, self.result
        if self.config.method == "lora":
            tensors = lora_state_dict(ml.model)
            merge_lora(ml.model)
        else:
            tensors = {n: p.detach().float().cpu() for n, p in self.params.items()}
        for p in ml.model.parameters():
            p.requires_grad_(False)
        ml.weights_changed()
        result.peak_rss_mb = max(result.peak_rss_mb, _peak_rss_mb())
        if ml.device.type == "cuda":
            result.peak_device_mb = max(result.peak_device_mb or 0.0, torch.cuda.max_memory_allocated(ml.device) / 2**20)
        return tensors

    # ------------------------------------------------------------------ the steps of run()
    def _schedule(self, n: int) -> Iterator[tuple[int, int, int]]:
        """``(epoch, index in the epoch's order, document)`` from the resume position on; each epoch its own
        seeded order."""
        start_epoch, start_d = self.position[0], self.position[1]
        cfg = self.config  # max_steps: as many passes as those steps take (run() stops at the last one)
        for epoch in itertools.count(start_epoch) if cfg.max_steps is not None else range(start_epoch, cfg.epochs):
            order = list(range(n))
            random.Random(f"{self.config.seed}-{epoch}").shuffle(order)
            for d in range(start_d if epoch == start_epoch else 0, n):
                yield epoch, d, order[d]

    def _document(self, namespace: str, where: tuple[int, int], name: str, tokens: list[int]) -> None:
        """Stream one document segment by segment with its own memory; stops early when the run is done."""
        ml = self.ml
        ml.bank.reset(namespace)  # memory is reset between documents
        stream = ml.stream(namespace, doc_id=name)
        skip = self.position[2] if where == self.position[:2] else 0
        for k, (segment, targets) in enumerate(segments(tokens, ml.config.step)):
            if k < skip:  # resumed mid-document: rebuild its memory and cache without gradients
                r0 = time.perf_counter()
                with torch.no_grad():
                    stream.step(segment, k=ml.config.top_k)
                self._restream += time.perf_counter() - r0
                continue
            self._train_segment(stream, segment, targets)
            if self._micro % self.config.grad_accum:
                continue
            self._optimizer_step((*where, k + 1))
            if self._done:
                return

    def _train_segment(self, stream: Stream, segment: list[int], targets: list[int]) -> None:
        """Forward one segment with retrieved memory (then stored), next-token loss, backward; count it."""
        ml, result = self.ml, self.result
        # chunks of this document have left the local cache, so there is memory to retrieve
        has_memory = ml.config.top_k > 0 and stream.offset - stream.cache_len > 0
        with autocast(ml, self.config):
            # every trained segment reads top_k retrieved chunks (ingest_top_k is for storing only)
            logits = stream.step(segment, logits=True, k=ml.config.top_k)
            loss = torch.nn.functional.cross_entropy(
                logits[0, : len(targets)].float(), torch.as_tensor(targets, device=logits.device))
        (loss / self.config.grad_accum).backward()
        result.segments += 1
        result.segments_with_memory += int(has_memory)
        result.tokens += len(targets)
        self._micro += 1
        self._window_loss += float(loss.detach())
        self._window_n += 1

    def _optimizer_step(self, next_position: tuple[int, int, int]) -> None:
        """Clip, step, log the mean loss since the last step; decide whether the run is done; checkpoint."""
        cfg, result = self.config, self.result
        self._unsaved = None  # an interrupt within the step leaves the last checkpoint as the resume point
        torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ml.weights_changed()  # recompute the sink's K-V
        result.steps += 1
        result.losses.append(self._window_loss / self._window_n)
        self._bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}")
        self._bar.update(1)
        self._window_loss, self._window_n = 0.0, 0
        result.seconds = time.perf_counter() - self._t0 - self._restream
        self._done = result.steps >= self.total_steps or (
            cfg.max_seconds is not None and time.perf_counter() - self._call_start >= cfg.max_seconds)
        if result.steps % cfg.save_every == 0 or self._done:
            self._save(next_position)
        else:
            self._unsaved = next_position, {key: getattr(result, key) for key in COUNTERS}

    def _save(self, next_position: tuple[int, int, int], counters: dict[str, Any] | None = None) -> None:
        """A checkpoint: trainable weights, optimizer, schedule, counters (default: the result's now) and the next
        segment to train."""
        result = self.result
        result.peak_rss_mb = max(result.peak_rss_mb, _peak_rss_mb())
        save_checkpoint(self.out, self.params, self.optimizer, self.scheduler,
                        {"step": result.steps, "losses": result.losses, "position": list(next_position),
                         "identity": self.identity, "eval_before": result.eval_before,
                         "counters": counters or {key: getattr(result, key) for key in COUNTERS}})
