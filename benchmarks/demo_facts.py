"""`memlong demo` for five facts: five invented facts at five depths in five plays, each ingested and asked the way
`memlong demo` does (memlong/demo.py's plant_fact / ask_fact; the CLI's demo defaults: top-k 4,
kv_reencode_head=32, memory capacity 65,536), one play at a time in a fresh namespace.

Per fact: play, depth, characters and tokens ingested, whether a stored chunk holds the answer word (else eviction
lost it), whether the fact's chunk was retrieved and at which rank, the answer, whether it contains the answer
word, time to first token and the retrieved tokens re-encoded. A summary line splits the wrong answers into
retrieval misses (fact's chunk not retrieved) and reading misses (retrieved, answer still wrong).

Each fact is also asked with the same retrieved chunks pasted as text before the same prompt (re-encoded, no
memory: what a text RAG pipeline gives the model). A reading miss whose pasted answer is right is a miss of
reading K-V; one whose pasted answer is wrong too is the model's (issue 15 separates the two).

    python benchmarks/demo_facts.py --json results/demo-facts.json            # whole plays: ~15 min in all (2 cores)
    python benchmarks/demo_facts.py --tiny --json results/demo-facts-tiny.json  # 24,000-character slices

``--tiny`` cuts each play to a 24,000-character slice taken around the fact's depth of the whole play, with the
fact planted at the same depth of the slice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CHARS = 24_000
PLAYS = ("hamlet", "macbeth", "othello", "lear", "tempest")
DEPTHS = (0.2, 0.35, 0.5, 0.65, 0.8)


def facts() -> list[Any]:
    """Five invented facts of the demo's kind (a subject, an unambiguous invented answer word, a place)."""
    from memlong.demo import DemoFact

    return [
        DemoFact("The favourite horse of the young prince is a grey mare named Tindra from the valley of Osk.",
                 "What is the favourite horse of the young prince?", "The favourite horse of the young prince is",
                 "Tindra"),
        DemoFact("The password of the castle gate is Brindlewick, chosen by the old captain of the guard.",
                 "What is the password of the castle gate?", "The password of the castle gate is", "Brindlewick"),
        DemoFact("The rare perfume of the duchess is made from blue moonpetal flowers from the hills of Castavel.",
                 "What is the rare perfume of the duchess made from?", "The rare perfume of the duchess is made from",
                 "moonpetal"),
        DemoFact("The secret spice of the winter wine is red quillberry from the orchards of Pellamar.",
                 "What is the secret spice of the winter wine?", "The secret spice of the winter wine is", "quillberry"),
        DemoFact("The hidden treasure of the old abbey is a silver astrolabe from the city of Morvane.",
                 "What is the hidden treasure of the old abbey?", "The hidden treasure of the old abbey is",
                 "astrolabe"),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plays", default=",".join(PLAYS),
                   help=f"comma-separated plays, one per fact (default {','.join(PLAYS)})")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="comma-separated depths, one per fact")
    p.add_argument("--facts", type=int, default=5, help="run the first N facts (default 5)")
    p.add_argument("--tiny", action="store_true", help=f"{TINY_CHARS:,}-character slices instead of whole plays")
    p.add_argument("--top-k", type=int, default=None, help="override the demo's top-k (default: the CLI's demo default)")
    p.add_argument("--kv-reencode-head", type=int, default=None, help="override the demo's kv_reencode_head")
    p.add_argument("--retrieve-next", type=int, default=None, help="override the demo's retrieve_next")
    p.add_argument("--adapter", default=None, help="an adapter folder, e.g. a reader written by memlong train-reader")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer budget (default 24, the demo's)")
    p.add_argument("--json", metavar="OUT", help="write config, summary and per-fact records (rewritten after each fact)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while ingesting")
    args = p.parse_args(argv)
    args.plays = [x.strip() for x in args.plays.split(",") if x.strip()]
    args.depths = [float(x) for x in args.depths.split(",") if x.strip()]
    if not 1 <= args.facts <= 5 or len(args.plays) < args.facts or len(args.depths) < args.facts:
        p.error(f"--facts must be 1..5, with at least that many --plays and --depths; got --facts {args.facts}, "
                f"{len(args.plays)} plays, {len(args.depths)} depths")
    if any(not 0 < d < 1 for d in args.depths):
        p.error(f"--depths must lie strictly between 0 and 1, got {args.depths}")
    return args


def document(play: str, depth: float, fact: Any, tiny: bool) -> str:
    """The play (or, with ``tiny``, a slice around ``depth`` of it) with ``fact`` planted at ``depth``."""
    from memlong.demo import plant_fact
    from memlong.evaluation import shakespeare_text

    text = shakespeare_text(play)
    if tiny and len(text) > TINY_CHARS:
        start = min(max(0, int(depth * len(text)) - int(depth * TINY_CHARS)), len(text) - TINY_CHARS)
        text = text[start:start + TINY_CHARS]
    return plant_fact(text, depth, fact)


def run_fact(ml: Any, fact: Any, play: str, depth: float, args: argparse.Namespace) -> dict[str, Any]:
    """Ingest one planted play into a fresh namespace and ask its fact, as `memlong demo` does."""
    from memlong.demo import ask_fact

    namespace = "demo-facts"
    ml.reset(namespace)
    text = document(play, depth, fact, args.tiny)
    stats = ml.ingest(text, namespace=namespace, progress=not args.no_progress)
    stored = any(fact.contains(ml.bank.get(c, namespace=namespace).text) for c in ml.bank.chunk_ids(namespace))
    asked = ask_fact(ml, fact, namespace=namespace, max_new_tokens=args.max_new_tokens)
    gen = asked["stats"]
    pasted = ask_pasted(ml, fact, namespace, gen.chunk_ids, args.max_new_tokens)
    ml.reset(namespace)
    return {"play": play, "depth": depth, "question": fact.question, "answer_word": fact.answer_word,
            "chars": len(text), "tokens": stats.tokens, "ingest_s": round(stats.seconds, 2),
            "fact_chunk_stored": stored, "fact_chunk_retrieved": asked["fact_chunk_rank"] is not None,
            "fact_chunk_rank": asked["fact_chunk_rank"], "retrieved_chunks": len(gen.chunk_ids),
            "answer": asked["answer"], "answer_contains_fact": asked["answer_contains_fact"],
            "time_to_first_token_s": round(gen.time_to_first_token, 3), "reencoded_tokens": gen.refreshed_tokens,
            "memory_tokens": gen.memory_tokens, "pasted_answer": pasted,
            "pasted_contains_fact": fact.contains(pasted)}


def ask_pasted(ml: Any, fact: Any, namespace: str, chunk_ids: list[str], max_new_tokens: int) -> str:
    """The answer with ``chunk_ids``' texts pasted in document order (the order their K-V are read in) before the
    demo's prompt, re-encoded with no memory."""
    from memlong.prompts import question_prompt

    chunks = sorted((ml.bank.get(c, namespace=namespace) for c in chunk_ids), key=lambda c: c.order)
    return ml.generate("".join(c.text for c in chunks) + question_prompt(fact.question), retrieve=False,
                       answer_prefix=" " + fact.answer_prefix, max_new_tokens=max_new_tokens)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    from memlong.evaluation import describe_misses, miss_counts

    misses = miss_counts([{"correct": r["answer_contains_fact"], "needle_seen": r["fact_chunk_retrieved"]}
                          for r in records])
    return {"facts": len(records), "answered": sum(r["answer_contains_fact"] for r in records),
            "pasted_answered": sum(r["pasted_contains_fact"] for r in records),
            "retrieved": sum(r["fact_chunk_retrieved"] for r in records),
            "retrieval_misses": misses["retrieval"], "reading_misses": misses["reading"],
            "failed": describe_misses(misses)}


def table(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = ["| play | depth | tokens | fact's chunk (rank) | answer contains the fact | TTFT | answer | pasted text |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        rank = f"rank {r['fact_chunk_rank']} of {r['retrieved_chunks']}" if r["fact_chunk_retrieved"] else \
            ("not retrieved" if r["fact_chunk_stored"] else "not stored (evicted)")
        answer = " ".join(r["answer"].split())[:60].replace("|", "/")
        lines.append(f"| {r['play']} | {r['depth']:.2f} | {r['tokens']:,} | {rank} | "
                     f"{'yes' if r['answer_contains_fact'] else 'no'} ({r['answer_word']}) | "
                     f"{r['time_to_first_token_s']:.2f} s | {answer} | "
                     f"{'yes' if r['pasted_contains_fact'] else 'no'}: {' '.join(r['pasted_answer'].split())[:40]} |")
    lines.append(f"\nAnswered {summary['answered']} of {summary['facts']} (the same chunks pasted as text: "
                 f"{summary['pasted_answered']}); fact's chunk retrieved for {summary['retrieved']}; failed: "
                 f"{summary['failed']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from memlong import MemLong
    from memlong.cli import CLI_DEFAULTS, COMMAND_DEFAULTS

    settings = {**CLI_DEFAULTS, **COMMAND_DEFAULTS["demo"]}  # what `memlong demo` runs with on the default model
    if args.top_k is not None:
        settings["top_k"] = args.top_k
    for name in ("kv_reencode_head", "retrieve_next"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    t0 = time.perf_counter()
    ml = MemLong.from_pretrained("default", adapter=args.adapter, **settings)
    config = {**{k: v for k, v in vars(args).items() if k != "json"}, "settings": settings, "memlong": repr(ml),
              "torch_threads": torch.get_num_threads(), "load_s": round(time.perf_counter() - t0, 2),
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    records: list[dict[str, Any]] = []
    for fact, play, depth in list(zip(facts(), args.plays, args.depths))[:args.facts]:
        print(f"--- {play} at depth {depth}: {fact.sentence}", file=sys.stderr)
        records.append(run_fact(ml, fact, play, depth, args))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"config": config, "summary": summarise(records),
                                                   "partial": len(records) < args.facts, "records": records}, indent=1))
    print(table(records, summarise(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
