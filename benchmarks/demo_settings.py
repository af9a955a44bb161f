"""The demo's question per reading setting: `memlong demo`'s scenario (a play with a planted fact), its memory
ingested once (or loaded), then the question asked at top-k 1, 2, 4, 8 with each method of kv_fidelity.py.

    python benchmarks/demo_settings.py --memory /tmp/hamlet-demo --methods kv,head=16,head=32,refresh=0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--play", default="hamlet")
    p.add_argument("--memory", required=True, help="folder: loaded when it exists, else the demo ingests and saves it")
    p.add_argument("--methods", default="kv,head=32", help="comma-separated kv_fidelity.py methods")
    p.add_argument("--top-k", default="1,2,4,8")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    from kv_fidelity import Method

    from memlong import MemLong
    from memlong.demo import ANSWER_PREFIX, QUESTION, run_demo
    from memlong.prompts import question_prompt

    ml = MemLong.from_pretrained("default", top_k=4, memory_capacity=65_536)  # the CLI's capacity
    exists = Path(args.memory).is_dir()
    summary = run_demo(ml, play=args.play, load_memory=args.memory if exists else None,
                       save_memory=None if exists else args.memory, progress=False)
    base, records = ml.config, []
    for spec in args.methods.split(","):
        m = Method.parse(spec)
        for k in (int(x) for x in args.top_k.split(",")):
            ml.config = dataclasses.replace(base, top_k=k, kv_refresh=m.kv_refresh,
                                            kv_reencode_head=m.kv_reencode_head,
                                            memory_temperature=m.memory_temperature, memory_scale=m.memory_scale)
            g = ml.generate(question_prompt(QUESTION), query=QUESTION, namespace="demo", answer_prefix=ANSWER_PREFIX,
                            max_new_tokens=16, stream=True)
            answer = g.text()
            records.append({"method": spec, "top_k": k, "answer": answer, "saffron": "saffron" in answer.lower(),
                            "ttft_s": g.stats.time_to_first_token, "reencoded": g.stats.refreshed_tokens})
            print(f"{spec}, top-k {k}: {'right' if records[-1]['saffron'] else 'wrong'} {answer!r}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"demo": summary, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
