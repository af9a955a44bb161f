"""Does a larger streaming step store K-V as good as the default one? Quality of the stored memory per ``ingest_step``.

Ingestion's cost is set by the step: each step of ``ingest_step`` tokens attends to the ``local_window -
ingest_step`` tokens kept from the step before, so 512-token steps in a 1,024-token window attend to 768 keys on
average where a plain prefill of the same windows attends to 512 (``benchmarks/cpu.py --ingest-steps`` times
it). A larger step is cheaper, but the first tokens of each step see less of the text before them when they are
stored. This measures what that costs the stored K-V, read back the way a user reads them:

* ``ppl``: the body of a play (all but its last ``--tail`` tokens) is ingested with each step; then the tail is
  scored (its last 2,048 tokens) with the default step, retrieving from that memory. Only the stored memory
  differs between rows; ``window`` is the same tail with no memory (the floor).
* ``passkey``: ``memlong.evaluation.passkey`` in memlong mode (the haystack ingested with the step, the question
  answered from retrieved K-V alone), the same haystacks and keys for every step (same seed): accuracy and the
  key's mean NLL, which moves before accuracy does.
* ``facts`` (``--facts N``): N play slices, each with one invented fact planted at a random depth (the same slices
  for every step), ingested with each step and asked at ``--fact-top-k`` (several chunks read at once).
* ``quickstart`` (``--quickstart-cuts``): the README quickstart's fact planted at several places in its document,
  asked as the quickstart asks it (how much a single documented answer depends on the step and the place).

    python benchmarks/ingest_steps.py --steps 512,768,1024 --json results/ingest-steps.json
    python benchmarks/ingest_steps.py --steps 512,896,1024 --no-ppl --passkey-length 0 --facts 28
    python benchmarks/ingest_steps.py --steps 512,896,1024 --no-ppl --passkey-length 0 --quickstart-cuts 5000,6000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import torch


def tail_ppl(ml, tokens: list[int], step: int | None, tail: int) -> dict:
    """Perplexity of the last 2,048 of ``tokens[-tail:]`` reading memory of ``tokens[:-tail]`` ingested at ``step``."""
    base = ml.config
    ns = f"_steps-{step}"
    ml.reset(ns)
    try:
        if step is not None:
            ml.config = dataclasses.replace(base, ingest_step=step)
            t0 = time.perf_counter()
            ml.ingest(ml.tokenizer.decode(tokens[:-tail]), namespace=ns, progress=False)
            seconds = time.perf_counter() - t0
            ml.config = base
        out = ml.perplexity(tokens[-tail:], score_last=2048, namespace=ns if step is not None else None,
                            use_memory=step is not None)
    finally:
        ml.config = base
        ml.reset(ns)
    return {"bench": "ppl", "ingest_step": step or "window", "ppl": out["ppl"], "scored_tokens": out["scored_tokens"],
            **({"ingest_s": seconds, "ingested_tokens": len(tokens) - tail} if step is not None else {})}


def planted_facts(ml, steps: list[int], trials: int, top_ks: list[int], seed: int = 0) -> list[dict]:
    """Multi-chunk reading of document memory: ``trials`` slices of the plays (10,000 characters) each with one
    invented fact planted at a random depth, ingested with each step and asked at each top-k (library defaults
    otherwise, as in docs/how-it-works.md's tour). Per row: accuracy and the fact chunk's retrieval."""
    import random

    from demo_facts import PLAYS, facts

    from memlong.demo import SAFFRON, DemoFact, ask_fact, plant_fact
    from memlong.evaluation import shakespeare_text

    pool = facts() + [SAFFRON, DemoFact("The keeper of the royal seal is Brannoc Vell.",
                                        "Who is the keeper of the royal seal?", "The keeper of the royal seal is",
                                        "Brannoc")]
    rng = random.Random(seed)
    cases = []
    for i in range(trials):
        text = shakespeare_text(PLAYS[i % len(PLAYS)])
        start = rng.randrange(0, len(text) - 10_000)
        cases.append((pool[i % len(pool)], plant_fact(text[start:start + 10_000], rng.uniform(0.1, 0.9),
                                                      pool[i % len(pool)])))
    base, out = ml.config, {}
    try:
        for step in steps:
            for fact, text in cases:
                ml.config = dataclasses.replace(base, ingest_step=step)
                ml.reset("_facts")
                ml.ingest(text, namespace="_facts", progress=False)
                for k in top_ks:
                    ml.config = dataclasses.replace(base, ingest_step=step, top_k=k)
                    asked = ask_fact(ml, fact, namespace="_facts", echo=False)
                    row = out.setdefault((step, k), {"bench": "facts", "ingest_step": step, "top_k": k,
                                                     "trials": 0, "correct": 0, "retrieved": 0, "answers": []})
                    row["trials"] += 1
                    row["correct"] += int(asked["answer_contains_fact"])
                    row["retrieved"] += int(asked["fact_chunk_rank"] is not None)
                    row["answers"].append({"fact": fact.answer_word, "rank": asked["fact_chunk_rank"],
                                           "answer": asked["answer"], "correct": asked["answer_contains_fact"]})
    finally:
        ml.config = base
        ml.reset("_facts")
    for row in out.values():
        row["accuracy"] = row["correct"] / row["trials"]
    return list(out.values())


def quickstart_cuts(ml, steps: list[int], cuts: list[int], top_ks: list[int]) -> list[dict]:
    """The README quickstart's fact (Macbeth's first 12,000 characters, the fact on its own line at the line break
    before each of ``cuts`` characters), ingested with each step and asked as the quickstart asks it, at each top-k.
    One row per cut, step and top-k: the answer and whether it names the fact."""
    from memlong.evaluation import shakespeare_text

    play = shakespeare_text("macbeth")[:12_000]
    question = "Who is the keeper of the northern tower?"
    base, rows = ml.config, []
    try:
        for at in cuts:
            cut = play.rfind("\n", 0, at)
            document = play[:cut] + "\nThe keeper of the northern tower is Halvora Quint.\n" + play[cut:]
            for step in steps:
                ml.config = dataclasses.replace(base, ingest_step=step)
                ml.reset("_quickstart")
                ml.ingest(document, namespace="_quickstart", progress=False)
                for k in top_ks:
                    ml.config = dataclasses.replace(base, ingest_step=step, top_k=k)
                    answer = ml.generate(f"\nQuestion: {question}\nAnswer:", query=question, namespace="_quickstart",
                                         answer_prefix=" The keeper of the northern tower is", max_new_tokens=8)
                    rows.append({"bench": "quickstart", "cut": at, "fact_token": len(ml.tokenize(play[:cut])),
                                 "ingest_step": step, "top_k": k, "answer": answer,
                                 "correct": re.search(r"Halvora\s+Quint", answer) is not None})  # not "Halvora\nCawdor"
    finally:
        ml.config = base
        ml.reset("_quickstart")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="512,768,1024", help="comma-separated ingest_step values")
    p.add_argument("--play", default="macbeth", help="play whose body is stored and whose tail is scored")
    p.add_argument("--tail", type=int, default=3072, help="tokens at the end streamed and scored (last 2,048)")
    p.add_argument("--passkey-length", type=int, default=8192, help="haystack tokens (0: skip passkey)")
    p.add_argument("--trials", type=int, default=10, help="passkey trials per step (the same for each step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity rows (passkey only)")
    p.add_argument("--facts", type=int, default=0, help="planted-fact trials per step (0: skip), asked at --fact-top-k")
    p.add_argument("--fact-top-k", default="4,8", help="comma-separated top-k values for the planted facts")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted facts' slices and depths")
    p.add_argument("--quickstart-cuts", default="",
                   help="comma-separated character offsets at which to plant the README quickstart's fact (asked at "
                        "--fact-top-k; empty: skip)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from memlong import MemLong
    from memlong.evaluation import passkey, shakespeare_text

    ml = MemLong.from_pretrained("default", memory_capacity=max(32_768, 2 * args.passkey_length))  # no eviction
    steps = [int(s) for s in args.steps.split(",")]
    tokens = ml.tokenize(shakespeare_text(args.play))
    rows = [] if args.no_ppl else [tail_ppl(ml, tokens, None, args.tail)] + [tail_ppl(ml, tokens, s, args.tail)
                                                                              for s in steps]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.passkey_length:
        base = ml.config
        for step in steps:
            ml.config = dataclasses.replace(base, ingest_step=step)
            rec = passkey(ml, lengths=[args.passkey_length], trials=args.trials, modes=("memlong",), progress=False)[0]
            keep = ("length", "accuracy", "trials", "key_nll", "retrieval_misses", "reading_misses")
            rows.append({"bench": "passkey", "ingest_step": step, **{k: rec[k] for k in keep}})
            print(json.dumps(rows[-1]), flush=True)
        ml.config = base
    if args.facts:
        for row in planted_facts(ml, steps, args.facts, [int(k) for k in args.fact_top_k.split(",")], args.seed):
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
    if args.quickstart_cuts:
        for row in quickstart_cuts(ml, steps, [int(c) for c in args.quickstart_cuts.split(",")],
                                   [int(k) for k in args.fact_top_k.split(",")]):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| bench | ingest_step | ppl / passkey accuracy | key NLL |\n| --- | --- | --- | --- |")
    for r in rows:
        if r["bench"] == "facts":
            print(f"| facts, top-k {r['top_k']} | {r['ingest_step']} | {r['correct']}/{r['trials']} "
                  f"(fact's chunk retrieved {r['retrieved']}) | |")
            continue
        if r["bench"] == "quickstart":
            print(f"| quickstart, cut {r['cut']}, top-k {r['top_k']} | {r['ingest_step']} | {r['answer']!r} | |")
            continue
        value = f"{r['ppl']:.3f}" if r["bench"] == "ppl" else f"{r['accuracy']:.2f} ({r['trials']} trials)"
        print(f"| {r['bench']} | {r['ingest_step']} | {value} | {r.get('key_nll', ''):.4} |"
              if "key_nll" in r else f"| {r['bench']} | {r['ingest_step']} | {value} | |")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "ingest_steps", "args": vars(args) | {"json": str(args.json)},
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "records": rows}, indent=1))


if __name__ == "__main__":
    main()
