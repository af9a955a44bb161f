"""What makes demonstrations in memory help ICL on the default model, and the full comparison (docs/icl.md).

    # 1. pick a direction: one seed, few sentences, memory settings side by side (storage x retrieval x k)
    python benchmarks/icl.py explore --task topic --n-test 60 --json results/icl-explore-topic.json
    # 2. the full measurement of the chosen default and the baselines (3 seeds x 200 sentences)
    python benchmarks/icl.py full --task topic --n-test 200 --seeds 0,1,2 --json results/icl-full-topic.json
    # 3. accuracy against demonstrations in memory, with a plot
    python benchmarks/icl.py sweep --task topic --sizes 0,50,200,1000 --json results/icl-sweep-topic.json
    python benchmarks/icl.py plot --seeds 0 --from results/icl-sweep-topic.json,results/icl-sweep-sentiment.json \
        --plot results/icl-sweep.png

Everything runs on one thread (``torch.set_num_threads(1)``): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memlong import MemLong
from memlong.icl import CONDITIONS, DEFAULTS, draw_sets, get_task, icl_eval, summarize
from memlong.icl_conditions import ConditionRunner
from memlong.icl_data import label_token_ids
from memlong.icl_memory import store_demos

# storage -> (retrieval, k) settings tried in ``explore``
GRID = {"stream": [("similar", 4), ("similar", 8)],
        "aligned": [("similar", 16)],
        "demo": [("similar", 8), ("similar", 16), ("similar", 32), ("balanced", 16)]}


def _write(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def explore(ml: MemLong, task_name: str, n_test: int, seed: int, memory_demos: int, shots: int) -> list[dict]:
    """Accuracy of each memory setting (and the prompt / pasted baselines) on one seed's test set."""
    task = get_task(task_name)
    test, prompt_demos, mem_demos = draw_sets(task, seed, n_test, shots, memory_demos)
    label_ids = label_token_ids(lambda t: ml.strip_sink(ml.tokenize(t)), task.labels)
    rows = []
    for storage, settings in GRID.items():
        ns = f"_icl-explore-{storage}"
        t0 = time.perf_counter()
        store = store_demos(ml, mem_demos, field=task.field, namespace=ns, storage=storage,
                            head=task.instruction + "\n\n")
        stored_s = time.perf_counter() - t0
        try:
            for retrieval, k in settings:
                runner = ConditionRunner(ml, task, prompt_demos, label_ids, store, retrieval, k)
                conditions = ["prompt+memory"]
                if storage == "demo" and (retrieval, k) == ("similar", 16):
                    conditions += ["zero_shot", "prompt", "prompt+retrieved_text"]
                for condition in conditions:
                    t0 = time.perf_counter()
                    out = runner.run(condition, test)
                    row = {"task": task.name, "seed": seed, "n": n_test, "condition": condition,
                           "storage": storage if "memory" in condition or "retrieved" in condition else None,
                           "retrieval": retrieval, "memory_k": k, "memory_demos": memory_demos,
                           "accuracy": out["correct"] / n_test, "correct": out["correct"],
                           "prompt_tokens": out["prompt_tokens"], "memory_tokens": out["memory_tokens"],
                           "seconds": time.perf_counter() - t0, "store_seconds": stored_s}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            ml.reset(ns)
    return rows


def sweep(ml: MemLong, task_name: str, sizes: list[int], n_test: int, seeds: list[int], shots: int) -> list[dict]:
    """Accuracy of ``prompt+memory`` (the default setting) against the demonstrations stored in memory."""
    rows = []
    for size in sizes:
        records = icl_eval(ml, task=task_name, shots=shots, memory_demos=size, n_test=n_test, seeds=seeds,
                           conditions=("prompt+memory",), progress=False)
        for r in records:
            print(json.dumps(r), flush=True)
        rows += records
    return rows


def plot(path: str, rows_by_task: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for task, rows in rows_by_task.items():
        summary = {r["memory_demos"]: r for r in rows}
        sizes = sorted(summary)
        acc = [summary[s]["accuracy"] for s in sizes]
        err = [[a - summary[s]["ci95_low"] for a, s in zip(acc, sizes)],
               [summary[s]["ci95_high"] - a for a, s in zip(acc, sizes)]]
        ax.errorbar([max(s, 10) for s in sizes], acc, yerr=err, marker="o", capsize=4, label=task)
    ax.set_xscale("log")
    ax.set_xlabel("demonstrations in memory (0 plotted at 10)")
    ax.set_ylabel("accuracy (prompt + memory)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("ICL from memory, default model (95 % Wilson intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep_points(paths: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """Per task, one summary row per memory size from sweep and full-run JSONs of the same seeds and test size.

    A full run's ``prompt`` records are the size-0 point and its ``prompt+memory`` records the point at its
    ``memory_demos``: the same computation as a sweep's (the test set and prompt of a seed do not depend on
    the memory size, and memory sets are nested), so a sweep need not repeat sizes a full run measured.
    """
    by_task: dict[str, dict[int, list[dict]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data["records"]:
            if r["seed"] not in seeds:
                continue
            if r["condition"] == "prompt":
                size = 0
            elif r["condition"] == "prompt+memory":
                size = r["memory_demos"]
            else:
                continue
            by_task.setdefault(r["task"], {}).setdefault(size, []).append(r)
    out = {}
    for task, sizes in by_task.items():
        rows = []
        for size in sorted(sizes):
            keys = {(r["seed"], r["n"]) for r in sizes[size]}
            unique = [next(r for r in sizes[size] if (r["seed"], r["n"]) == key) for key in sorted(keys)]
            (row,) = summarize([{**r, "condition": "prompt+memory"} for r in unique])
            rows.append({**row, "memory_demos": size, "seeds_n": sorted(keys)})
        out[task] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["explore", "full", "sweep", "plot"])
    parser.add_argument("--task", default="topic")
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--memory-demos", type=int, default=200)
    parser.add_argument("--sizes", default="0,50,200,1000")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--n-pasted", type=int, default=None, help="full: score the pasted condition on the first "
                                                                   "N test sentences per seed only (it is the costly one)")
    parser.add_argument("--memory-k", type=int, default=DEFAULTS["memory_k"])
    parser.add_argument("--storage", default=DEFAULTS["storage"])
    parser.add_argument("--retrieval", default=DEFAULTS["retrieval"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="plot: the PNG to write (and a JSON of its points beside it)")
    parser.add_argument("--from", dest="sources", default="", help="plot: comma-separated sweep/full JSON files")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    ml = MemLong.from_pretrained("default", memory_capacity=400_000) if args.what != "plot" else None
    t0 = time.perf_counter()
    meta = {"command": "python benchmarks/icl.py " + " ".join(sys.argv[1:] if argv is None else argv), "model": "default",
            "machine": "2-core shared CPU, 1 thread", "date": time.strftime("%Y-%m-%d"), "defaults": DEFAULTS}
    if args.what == "explore":
        rows = explore(ml, args.task, args.n_test, seeds[0], args.memory_demos, args.shots)
        _write(args.json, {**meta, "seconds": time.perf_counter() - t0, "rows": rows})
    elif args.what == "full":  # seed by seed, the JSON rewritten after each (a stopped run keeps its seeds)
        records: list[dict] = []
        for seed in seeds:
            records += icl_eval(ml, task=args.task, shots=args.shots, memory_demos=args.memory_demos,
                                n_test=args.n_test, seeds=[seed], conditions=args.conditions.split(","),
                                storage=args.storage, retrieval=args.retrieval, memory_k=args.memory_k,
                                n_pasted=args.n_pasted, progress=False)
            for r in records[-len(args.conditions.split(",")):]:
                print(json.dumps({k: v for k, v in r.items() if k != "outcomes"}), flush=True)
            _write(args.json, {**meta, "seconds": time.perf_counter() - t0, "records": records,
                               "summary": summarize(records)})
    elif args.what == "sweep":
        rows = sweep(ml, args.task, [int(s) for s in args.sizes.split(",")], args.n_test, seeds, args.shots)
        _write(args.json, {**meta, "seconds": time.perf_counter() - t0, "records": rows})
    else:
        points = sweep_points([p for p in args.sources.split(",") if p], seeds)
        plot(args.plot, points)
        _write(str(Path(args.plot).with_suffix(".json")), {**meta, "sources": args.sources.split(","),
                                                          "points": points})
    return 0

if __name__ == "__main__":
    sys.exit(main())
