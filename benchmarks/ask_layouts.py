"""Which question layout `memlong ask` uses: planted facts asked the way `memlong ask` asks them (memlong/ask.py's
``ask``: no answer words forced, unlike `memlong demo`), once in each layout (role, chat, plain).

Each fact (memlong.demo's SAFFRON and benchmarks/demo_facts.py's five) is planted at half depth of the first
``--chars`` characters of each play, ingested into a fresh namespace with `memlong ask`'s settings (the CLI's ask
defaults: top-k 4, kv_reencode_head=32), and asked in every layout from the same memory. An answer is right when it
contains the fact's answer word. Prints a table per question and the count per layout; ``--json`` writes both.

    python benchmarks/ask_layouts.py --json results/ask-layouts-cpu.json      # 12 questions: ~7 min on 2 cores
    python benchmarks/ask_layouts.py --tiny                                    # 1 fact, 1 play, 4,000 characters
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
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plays", default="macbeth,othello", help="comma-separated plays (default macbeth,othello)")
    p.add_argument("--chars", type=int, default=20_000, help="characters of each play read (default 20000)")
    p.add_argument("--facts", type=int, default=6, help="the first N of the 6 facts (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="answer budget (default 40)")
    p.add_argument("--tiny", action="store_true", help="1 fact, 1 play, 4,000 characters (a smoke run)")
    p.add_argument("--json", metavar="OUT", help="write config, counts and per-question records")
    args = p.parse_args(argv)
    args.plays = [x.strip() for x in args.plays.split(",") if x.strip()]
    if args.tiny:
        args.plays, args.chars, args.facts = args.plays[:1], 4_000, 1
    if not 1 <= args.facts <= 6 or not args.plays or args.chars < 1000:
        p.error("--facts must be 1..6, --plays non-empty and --chars at least 1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from demo_facts import facts

    from memlong import MemLong
    from memlong.ask import LAYOUTS, ask
    from memlong.cli import CLI_DEFAULTS, COMMAND_DEFAULTS
    from memlong.demo import SAFFRON, plant_fact
    from memlong.evaluation import shakespeare_text

    settings = {**CLI_DEFAULTS, **COMMAND_DEFAULTS["ask"]}
    ml = MemLong.from_pretrained("default", **settings)
    records: list[dict[str, Any]] = []
    for play in args.plays:
        for fact in [SAFFRON, *facts()][:args.facts]:
            ml.reset("ask")
            ml.ingest(plant_fact(shakespeare_text(play)[:args.chars], 0.5, fact), namespace="ask", progress=False)
            for layout in LAYOUTS:
                asked = ask(ml, fact.question, namespace="ask", max_new_tokens=args.max_new_tokens, layout=layout)
                records.append({"play": play, "answer_word": fact.answer_word, "layout": layout,
                                "answer": asked["answer"], "right": fact.contains(asked["answer"]),
                                "fact_chunk_retrieved": any(fact.contains(s["text"]) or fact.contains(
                                    ml.bank.get(s["chunk_id"], namespace="ask").text) for s in asked["sources"])})
    counts = {layout: sum(r["right"] for r in records if r["layout"] == layout) for layout in LAYOUTS}
    print("| play | fact | layout | right | answer |\n| --- | --- | --- | --- | --- |")
    for r in records:
        print(f"| {r['play']} | {r['answer_word']} | {r['layout']} | {'yes' if r['right'] else 'no'} | "
              f"{' '.join(r['answer'].split())[:70].replace('|', '/')} |")
    questions = len(records) // len(LAYOUTS)
    print("\n" + ", ".join(f"{layout}: {n} of {questions} right" for layout, n in counts.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        config = {**vars(args), "settings": settings, "memlong": repr(ml), "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"config": config, "counts": counts, "questions": questions,
                                               "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
