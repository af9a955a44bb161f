"""What one streaming step and one decode step cost in tensor operations, beside a plain prefill of the same tokens.

On a GPU a step of a small or mid-sized model is bound by kernel launches and Python, not by its matrix work
(issue 21: 34 ms per 512-token step for 5-8 ms of matrix work on an H100), so the number of operations a step
dispatches is the figure to bring down; it is counted the same way on any device. For each row: the top-level
``aten::`` operations of one call (operations called by other operations are not counted again), per layer, the
most frequent ones, and the call's wall time: the mean of ``--repeats`` calls after a warm-up, for decode steps the
median of ``--decode-repeats`` steps per mode, the modes taking turns.

* ``stream step``: a steady-state ``Stream.step`` of ``store_step`` tokens (what ``ingest`` runs: sink, a full local
  cache, the bank write of the step's chunks, their embeddings in batches);
* ``plain prefill``: the stock decoder over the same number of tokens, no memory (the issue's reference);
* ``decode step``: one token of ``ml.decode`` with ``--memory-tokens`` of retrieved K-V, per ``--decode-modes``.

    python benchmarks/step_profile.py --json results/step-profile-cpu.json
    python benchmarks/step_profile.py --device cuda --json results/step-profile-gpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def _top_level_ops(prof) -> collections.Counter:
    """Names of the ``aten::`` operations not called from inside another ``aten::`` operation."""
    counts = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def measure(name: str, call, layers: int, repeats: int, device: str) -> dict:
    """Profile one ``call()`` (after one warm-up call), then time ``repeats`` more (mean)."""
    def synced():
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    synced()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        synced()
    t0 = time.perf_counter()
    for _ in range(repeats):
        synced()
    ops = _top_level_ops(prof)
    total = sum(ops.values())
    return {"row": name, "ops": total, "ops_per_layer": round(total / layers, 1),
            "seconds": (time.perf_counter() - t0) / repeats if repeats else None, "top_ops": dict(ops.most_common(8))}


def run(ml, tokens: list[int], repeats: int, device: str, memory_tokens: int, decode_modes: list[str],
        decode_repeats: int = 20) -> list[dict]:
    import dataclasses

    from memlong.streaming import Stream

    size, layers = ml.config.store_step, ml.num_layers
    need = size * (4 + 2 * repeats)
    if len(tokens) < need:
        raise ValueError(f"need {need} tokens of text, got {len(tokens)}")
    stream = Stream(ml, "_profile", doc_id="d", batch_writes=ml.config.ingest_k == 0, step_size=size)
    steps = iter(range(0, len(tokens), size))
    rows = []
    with torch.no_grad():
        for _ in range(2):  # fill the local cache: the steps measured are steady-state ones
            s = next(steps)
            stream.step(tokens[s:s + size])
        rows.append(measure("stream step", lambda: stream.step(tokens[(s := next(steps)):s + size]), layers, repeats,
                            device))
        ids = torch.tensor([tokens[:size]], device=ml.device)
        rows.append(measure("plain prefill", lambda: ml.decoder(input_ids=ids, use_cache=False), layers, repeats,
                            device))
    stream.flush()
    chunks = ml.bank.chunk_ids("_profile")[: max(1, memory_tokens // ml.config.chunk_size)]
    memory = ml.memory_for(chunks, "_profile")
    prompt = ml.encode_prompt("What happens next?")
    base, gens = ml.config, {}
    try:
        for mode in decode_modes:  # a generation reads decode_mode when it starts: on its first token
            ml.config = dataclasses.replace(base, decode_mode=mode)
            gens[mode] = ml.decode(prompt, memory, max_new_tokens=decode_repeats + 8)
            next(gens[mode])  # prompt encoded, first token out: the calls measured are single-token steps
        ml.config = base

        def step(mode: str) -> None:
            if next(gens[mode], None) is None:
                raise RuntimeError("the answer ended before the measured steps; lower --decode-repeats")

        decode = {mode: measure(f"decode step ({mode})", lambda m=mode: step(m), layers, 0, device) for mode in gens}
        times = {mode: [] for mode in gens}
        for _ in range(decode_repeats):  # the modes take turns, so that a slower moment of the machine hits all
            for mode in gens:
                t0 = time.perf_counter()
                step(mode)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
        for mode, row in decode.items():
            row["seconds"] = statistics.median(times[mode])
            rows.append(row)
    finally:
        ml.config = base
        for gen in gens.values():
            gen.close()
    for row in rows:
        row.update(device=device, layers=layers, step_tokens=size, memory_tokens=int(memory[0].shape[2]))
    ml.reset("_profile")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| call | aten ops | per layer | mean s | most frequent |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        top = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in list(r["top_ops"].items())[:4])
        lines.append(f"| {r['row']} | {r['ops']} | {r['ops_per_layer']} | {r['seconds']:.4f} | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="default", help="model name or path (default: the embedded default model)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the loader's for the device)")
    p.add_argument("--play", default="hamlet", help="the text streamed (a play of the shakespeare package)")
    p.add_argument("--memory-tokens", type=int, default=1024, help="retrieved K-V tokens of the decode steps")
    p.add_argument("--decode-modes", default="dynamic,static,compiled",
                   help="comma-separated MemLongConfig.decode_mode values")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the stream step and the prefill")
    p.add_argument("--decode-repeats", type=int, default=20, help="timed decode steps per mode")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    modes = [m for m in args.decode_modes.split(",") if m]
    if set(modes) - {"dynamic", "static", "compiled"}:
        p.error(f"--decode-modes {args.decode_modes!r}: choose from dynamic,static,compiled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from memlong import MemLong
    from memlong.evaluation import shakespeare_text

    ml = MemLong.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    tokens = ml.tokenize(shakespeare_text(args.play))
    rows = run(ml, tokens, args.repeats, args.device, args.memory_tokens,
               modes, args.decode_repeats)
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
