"""Reader adapters: a LoRA that teaches the decoder to read several chunk-alone K-V the way it reads their text.

Chunks stored alone (chunk-context memory) and read together at answer time never attended to one another, so four
retrieved chunks read as K-V answer differently from the same four chunks pasted as text (docs/rag-fidelity.md).
Block-Attention, TurboRAG and KVLink close that gap by fine-tuning the model on independently encoded blocks. A
*reader* does it without touching anything that is stored: LoRA factors on the attention projections of every
layer, **not merged** into the weights and **active only in answer-time forwards that read retrieved memory**
(``run`` / decoding / scoring with memory: :attr:`memlong.attention.AttentionContext.reads_memory`), and only while
``config.memory_reader`` is true. Ingestion, streaming, stored K-V, re-encoding (``kv_refresh``,
``kv_reencode_head``) and every forward without memory use the base weights bit for bit, so a bank built without a
reader is read with one, and switching it off gives today's logits exactly.

Training (:func:`train_reader`, ``memlong train-reader``) is distillation from the same base model:

* data: plays of the ``shakespeare`` package that no benchmark, demo or evaluation reads
  (:data:`READER_EXCLUDED`), cut to ``chars`` characters, with invented facts planted in templates of their own
  (not the ``planted_fact_documents`` ones, not the gazetteer's), stored as chunk-context memory;
* an example is ``k`` chunks (``k`` drawn from ``top_k``) and a *tail*: a question about a planted fact with its
  answer (the chunks are what dense search retrieves for it), or a line copied from one of ``k`` random chunks;
* teacher: the base model over ``[sink] + the chunks' texts + tail``; student: the reader over ``[sink] + the
  chunks' stored K-V + tail``; loss: KL(teacher || student) of the next-token distributions, averaged over the
  tail plus averaged over the positions that predict the answer.

The result is an adapter folder (:mod:`memlong.adapter`'s format, ``method: "reader"``) that
``MemLong.from_pretrained(..., adapter=PATH)`` attaches instead of merging.

Example:
    >>> ml = MemLong.from_pretrained("default", adapter="runs/reader")     # memlong train-reader --output runs/reader
    >>> ml.generate("Who keeps the abbey bell?", namespace="docs")          # memory read through the reader
    >>> ml.config = dataclasses.replace(ml.config, memory_reader=False)     # the base model's reading again
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memlong.adapter import (
    LoRALinear,
    _modules,
    add_lora,
    check_lora_factors,
    check_output_dir,
    fingerprint,
    lora_state_dict,
    read_adapter_config,
    resolve_adapter,
)

if TYPE_CHECKING:
    from memlong.config import MemLongConfig
    from memlong.model import MemLong

__all__ = ["READER_EXCLUDED", "Reader", "ReaderConfig", "attach_reader", "check_reader_layout", "reader_corpus",
           "reader_examples", "train_reader"]

# Plays some benchmark, demo, evaluation or held-out split reads: never trained on by a reader.
READER_EXCLUDED = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "twelfth_night", "tempest")
_NAMES = ["Aldous Fenwick", "Corinna Vale", "Jasper Thorn", "Liesel Marsh", "Oswin Reed", "Petra Lowell",
          "Quentin Hale", "Sabine Orr", "Ulric Dane", "Wilhelmina Stroud", "Yannick Ferro", "Zora Kettle"]
_TOWNS = ["Eastmere", "Holloway Cross", "Brackenford", "Little Sutton", "Wexcombe", "Daleport", "Farrowby",
          "Crane Hollow"]
_THINGS = ["lantern", "ledger", "tapestry", "compass", "violin", "clock", "carriage", "banner", "goblet", "sundial"]
_COLOURS = ["amber", "teal", "scarlet", "ivory", "olive", "cobalt", "saffron", "plum"]
_NUMBERS = ["seven", "twelve", "forty", "three", "nineteen", "sixty", "eleven", "twenty"]
_FORMS = (("\nQuestion: ", "\nAnswer: "), ("\nQ: ", "\nA: "), ("\nUser: ", "\nAssistant: "))


@dataclass(frozen=True)
class ReaderConfig:
    """How :func:`train_reader` trains. Defaults: the run measured in docs/rag-fidelity.md ("A reader adapter")."""

    output_dir: str
    steps: int = 600
    rank: int = 16
    alpha: float = 32.0
    lr: float = 3e-4
    top_k: tuple[int, ...] = (1, 2, 3, 4, 4, 6, 8)
    copy_share: float = 0.4
    chars: int = 20_000
    facts_per_play: int = 6
    plays: tuple[str, ...] = ("julius_caesar", "merchant_of_venice", "as_you_like_it", "coriolanus", "cymbeline",
                              "henry_v", "much_ado_about_nothing", "midsummer_nights_dream", "measure_for_measure",
                              "comedy_of_errors")
    seed: int = 0
    save_every: int = 200

    def validate(self) -> None:
        if self.steps < 1 or self.rank < 1 or self.lr <= 0 or self.chars < 1000 or self.facts_per_play < 1:
            raise ValueError("ReaderConfig: steps, rank and facts_per_play must be >= 1, lr > 0, chars >= 1000.")
        if not self.top_k or min(self.top_k) < 1:
            raise ValueError(f"ReaderConfig.top_k must list chunk counts >= 1, got {self.top_k!r}.")
        if not 0 <= self.copy_share <= 1:
            raise ValueError(f"ReaderConfig.copy_share must be in [0, 1], got {self.copy_share!r}.")
        excluded = sorted(set(self.plays) & set(READER_EXCLUDED))
        if excluded:
            raise ValueError(f"Plays {excluded} are read by the benchmarks; train a reader on others.")


class Reader:
    """The attached LoRA layers of a reader. A forward pre-hook on the decoder switches them on for each forward
    whose attention context reads retrieved memory at answer time, while ``ml.config.memory_reader`` is true."""

    def __init__(self, ml: MemLong, layers: dict[str, LoRALinear], meta: dict[str, Any]) -> None:
        self.layers, self.meta = layers, meta
        self._active = True
        self.active = False  # switches every layer off (the setter only acts on a change)

        def switch(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ctx = kwargs.get("memlong_context")
            self.active = bool(ctx is not None and ctx.reads_memory and ml.config.memory_reader)

        ml.decoder.register_forward_pre_hook(switch, with_kwargs=True)

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        if on != self._active:
            for m in self.layers.values():
                m.enabled = on
            self._active = on

    def __repr__(self) -> str:
        return f"Reader(rank={self.meta['lora']['rank']}, layers={len(self.meta['layers'])})"


def check_reader_layout(cfg: MemLongConfig) -> None:
    """ValueError unless ``cfg`` reads memory as a reader is trained to (per layer, continual layout)."""
    if cfg.kv_source != "per_layer" or cfg.position_layout != "continual":
        raise ValueError(f"A reader reads chunk-context memory per layer in the continual layout (as it is trained); "
                         f"this config has kv_source={cfg.kv_source!r}, position_layout={cfg.position_layout!r}: use "
                         "kv_source='per_layer', position_layout='continual' (the defaults).")


def attach_reader(ml: MemLong, path: str | Path, *, check_fingerprint: bool = True) -> Reader:
    """Attach the reader adapter at ``path`` (a folder or a packaged name) to ``ml``; returns it (also ``ml.reader``).

    Raises:
        ValueError: not a reader adapter, trained on other base weights, or ``ml`` already has a reader.
    """
    from safetensors.torch import load_file

    folder = resolve_adapter(path)
    meta = read_adapter_config(folder)
    if meta.get("method") != "reader":
        raise ValueError(f"{folder} holds a {meta.get('method')!r} adapter, not a reader; load it with "
                         "MemLong.from_pretrained(adapter=...), which merges it.")
    if ml.reader is not None:
        raise ValueError("This model already has a reader attached; load a fresh model for another one.")
    expected = meta.get("base_model", {}).get("fingerprint")
    if check_fingerprint and expected and expected != fingerprint(ml.model, meta["layers"]):
        raise ValueError(f"The reader at {folder} was trained on base model {meta['base_model'].get('name')!r} "
                         f"(fingerprint {expected}); this model's weights differ. Load the base model it was "
                         "trained on.")
    tensors = load_file(str(folder / "adapter.safetensors"))
    expected = {f"{name}.lora_{x}" for name in _modules(ml.model, meta["layers"], meta["lora"]["targets"]) for x in "AB"}
    if expected != set(tensors):  # checked, with the shapes, before add_lora allocates factors of the file's rank
        raise ValueError(f"The reader at {folder} holds factors for other layers than its adapter.json names: the folder "
                         "was changed or is incomplete; train it again (memlong train-reader) or restore it.")
    check_lora_factors(meta, tensors, ml.model)
    check_reader_layout(ml.config)  # (it loaded, silently, and changed the logits)
    layers = add_lora(ml.model, meta["layers"], rank=int(meta["lora"]["rank"]), alpha=float(meta["lora"]["alpha"]),
                      targets=tuple(meta["lora"]["targets"]))
    with torch.no_grad():
        for name, module in layers.items():
            module.lora_A.copy_(tensors[f"{name}.lora_A"])
            module.lora_B.copy_(tensors[f"{name}.lora_B"])
    for module in layers.values():
        module.requires_grad_(False)
    ml.reader = Reader(ml, layers, meta)
    return ml.reader


# ---------------------------------------------------------------------------------------------- data
def _fact(rng: random.Random) -> tuple[str, str, str, str]:
    """``(sentence, question, answer prefix, answer)`` of one invented fact."""
    n, t, th = rng.choice(_NAMES), rng.choice(_TOWNS), rng.choice(_THINGS)
    c, k = rng.choice(_COLOURS), rng.choice(_NUMBERS)
    return rng.choice([
        (f"{n} was born in the town of {t}.", f"Where was {n} born?", f"{n} was born in", t),
        (f"The {th} of {t} is painted {c}.", f"What colour is the {th} of {t}?", f"The {th} of {t} is painted", c),
        (f"The {th} in {t} was made by {n}.", f"Who made the {th} in {t}?", f"The {th} in {t} was made by", n),
        (f"The tower of {t} has {k} bells.", f"How many bells does the tower of {t} have?", f"The tower of {t} has",
         k),
        (f"{n} keeps a {c} {th} under the stairs.", f"What does {n} keep under the stairs?", f"{n} keeps a",
         f"{c} {th}"),
    ])


def reader_corpus(config: ReaderConfig) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """The training documents (``config.plays`` cut to ``config.chars``, facts planted at spread depths) and facts."""
    from memlong.evaluation import shakespeare_text

    rng = random.Random(config.seed)
    docs, facts = [], []
    for play in config.plays:
        lines = shakespeare_text(play)[: config.chars].split("\n")
        n = config.facts_per_play
        for j in range(n):
            fact = _fact(rng)
            lines.insert(int(len(lines) * (0.05 + 0.9 * (j + rng.uniform(0.25, 0.75)) / n)), fact[0])
            facts.append(fact)
        docs.append("\n".join(lines))
    return docs, facts


def reader_examples(ml: MemLong, namespace: str, facts: Sequence[tuple[str, str, str, str]], n: int,
                    config: ReaderConfig) -> list[tuple[list[str], str, str]]:
    """``n`` examples ``(chunk ids in document order, prompt, answer)`` over the chunk-context memory in
    ``namespace``; the tail is the prompt followed by its answer."""
    rng = random.Random(config.seed + 1)
    order = {c: i for i, c in enumerate(ml.bank.chunk_ids(namespace))}
    ids = list(order)
    out = []
    for _ in range(n):
        k = min(rng.choice(config.top_k), len(ids))
        if rng.random() >= config.copy_share:
            _, question, prefix, answer = rng.choice(facts)
            hits = [h.chunk_id for h in ml.bank.search(question, namespace=namespace, k=k, count=False)]
            ask, reply = rng.choice(_FORMS)
            prompt, answer = f"{ask}{question}{reply}{prefix}", f" {answer}."
        else:
            hits = rng.sample(ids, k)
            text = ml.bank.get(rng.choice(hits), namespace=namespace).text
            lines = [x.strip() for x in text.split("\n") if len(x.split()) >= 4] or [text[:80].strip()]
            prompt, answer = "\n" + rng.choice(["Quote:", "Repeat the line:", ""]), " " + rng.choice(lines)
        out.append((sorted(hits, key=order.__getitem__), prompt, answer))
    return out


def distill_loss(ml: MemLong, hits: Sequence[str], prompt: str, answer: str, namespace: str) -> torch.Tensor:
    """KL(base model over pasted chunks + tail || reader over stored K-V + tail) of the next-token distributions,
    mean over the tail's positions plus mean over the positions that predict the answer (tail: prompt + answer)."""
    text = "".join(ml.bank.get(c, namespace=namespace).text for c in hits)
    prompt_ids = ml.strip_sink(ml.tokenize(prompt))
    context, tail_ids = ml.encode_prompt(text), prompt_ids + ml.strip_sink(ml.tokenize(answer))
    with torch.no_grad():  # no memory: the decoder's pre-hook keeps the reader off for the teacher
        teacher = ml.run(context + tail_ids, logits_for=slice(len(context), None)).logits[0].log_softmax(-1)
        memory = ml.memory_for(list(hits), namespace)
        if ml.config.kv_refresh or ml.config.kv_reencode_head:  # trained on what it will read (base weights)
            memory, _ = ml.refresh(memory, list(hits), namespace)
    # the decoder's pre-hook switches the reader on: this forward reads memory at answer time
    student = ml.run(tail_ids, memory=memory).logits[0].log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)[:-1]
    return kl.mean() + kl[len(prompt_ids) - 1:].mean()


def train_reader(ml: MemLong, config: ReaderConfig, *, progress: bool = True, command: str = "") -> Path:
    """Train a reader for ``ml`` (base weights, chunk-context memory) and write it to ``config.output_dir``.

    ``ml`` keeps the trained reader attached (``ml.reader``). Its bank gets a namespace ``_reader_train``, dropped
    at the end. Returns the adapter folder.

    Raises:
        ValueError: a bad config, a model that already has a reader, or settings a reader cannot read with.
    """
    from tqdm.auto import tqdm

    config.validate()
    check_output_dir(config.output_dir, "reader")
    if ml.reader is not None:
        raise ValueError("This model already has a reader; train from the base model.")
    check_reader_layout(cfg := ml.config)
    need = max(config.top_k) * cfg.chunk_size + 128
    if cfg.local_window < need:
        raise ValueError(f"The teacher pastes up to {max(config.top_k)} chunks of {cfg.chunk_size} tokens plus the "
                         f"question: local_window must be at least {need}, got {cfg.local_window}. Load the model "
                         f"with local_window={need} or more (memlong train-reader --local-window 2048).")
    ns, t0 = "_reader_train", time.perf_counter()
    docs, facts = reader_corpus(config)
    tokens = sum(len(ml.tokenize(d)) for d in docs)
    if tokens > ml.bank.capacity:  # eviction would silently drop planted facts' chunks
        raise ValueError(f"The reader's training text is {tokens} tokens, more than the bank's capacity of "
                         f"{ml.bank.capacity} per namespace: load the model with memory_capacity={2 * tokens} "
                         "(memlong train-reader uses the CLI's 65,536) or lower ReaderConfig.chars.")
    ml.reset(ns)
    ml.ingest(docs, namespace=ns, context="chunk", progress=progress)
    examples = reader_examples(ml, ns, facts, config.steps, config)
    for p in ml.model.parameters():
        p.requires_grad_(False)
    layers = list(range(ml.num_layers))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    meta = {"method": "reader", "lora": {"rank": config.rank, "alpha": config.alpha, "targets": list(targets)},
            "layers": layers, "memlong_config": {"kv_source": cfg.kv_source, "position_layout": cfg.position_layout,
                                                 "chunk_size": cfg.chunk_size, "attention_sink": cfg.attention_sink},
            "base_model": {"name": str(getattr(ml.model.config, "name_or_path", "")),
                           "fingerprint": fingerprint(ml.model, layers)},
            "reader_config": dataclasses.asdict(config), "command": command}
    lora = add_lora(ml.model, layers, rank=config.rank, alpha=config.alpha, targets=targets, seed=config.seed)
    reader = ml.reader = Reader(ml, lora, meta)
    params = [p for m in reader.layers.values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(examples, desc="train reader", disable=not progress)
    try:
        for i, (hits, prompt, answer) in enumerate(bar, 1):
            loss = distill_loss(ml, hits, prompt, answer, ns)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if i % config.save_every == 0 or i == len(examples):
                meta["training"] = {"steps": i, "seconds": round(time.perf_counter() - t0, 1),
                                    "kl_last_20": sum(losses[-20:]) / len(losses[-20:])}
                _save(ml, config.output_dir, meta, losses)
    finally:
        reader.active = False
        for p in params:
            p.requires_grad_(False)
        ml.reset(ns)
    return Path(config.output_dir)


def _save(ml: MemLong, folder: str, meta: dict[str, Any], losses: list[float]) -> None:
    from memlong.adapter import save_adapter
    from memlong.checkpoint import write_new

    save_adapter(folder, lora_state_dict(ml.model), meta)
    write_new(Path(folder) / "losses.json", (json.dumps([round(x, 5) for x in losses]) + "\n").encode())
