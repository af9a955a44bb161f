"""Labeled data for in-context learning: the built-in tasks and the user's own CSV / TSV / JSONL files.

A task is a list of ``(text, label word)`` pairs plus the prompt's instruction and field name. Label words
are what the model is scored on (the label whose word's first token gets the highest logit wins), so they are
either given (``label_words={"pos": "positive", ...}``) or the labels themselves.

Every problem with a file is a ``ValueError`` with one line naming the problem and the fix: an empty file, a
file that is not UTF-8, a missing column (the columns found are listed), a row with no text or no label, a
label column with one class. Problems that depend on the model or the requested sizes (labels whose first
tokens collide, too few examples) are checked by :func:`label_token_ids` and :func:`check_sizes`.

Example:
    >>> task = load_labeled_file("reviews.csv", text_column="review", label_column="stars",
    ...                          label_words={"1": "bad", "5": "good"})
    >>> task.labels, len(task.pairs)
    (['bad', 'good'], 480)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ICLTask", "check_sizes", "label_token_ids", "load_labeled_file", "parse_label_words", "unique_pairs"]

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class ICLTask:
    """A labeled classification task: ``pairs`` of ``(text, label word)``, the prompt's ``instruction`` and the
    ``field`` name each text is introduced with (``"Review: ...\\nAnswer: positive"``).

    Example:
        >>> ICLTask("mini", (("great film", "positive"), ("dull", "negative")), "Classify ...", "Review").labels
        ['negative', 'positive']
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    instruction: str
    field: str

    @property
    def labels(self) -> list[str]:
        """The distinct label words, sorted."""
        return sorted({label for _, label in self.pairs})


def parse_label_words(spec: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``"pos=positive,neg=negative"`` (the CLI's ``--label-words``) or a mapping -> ``{label: word}``.

    Example:
        >>> parse_label_words("1=bad,5=good")
        {'1': 'bad', '5': 'good'}
    """
    if spec is None or isinstance(spec, Mapping):
        return None if spec is None else {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise ValueError(f"Label words {spec!r}: item {item!r} is not LABEL=WORD; write e.g. "
                             "'pos=positive,neg=negative'.")
        out[label.strip()] = " ".join(word.split())
    if not out:
        raise ValueError("Label words are empty; write e.g. 'pos=positive,neg=negative' or leave them out.")
    return out


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"Data file {path} does not exist (or is not a file); pass the path of a CSV, TSV or "
                         "JSONL file.")


def _read_text(path: Path) -> str:
    _check_exists(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"Data file {path} is empty; write a header row and one labeled example per row.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"Data file {path} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                         f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8.csv`.") from None


def _rows(path: Path, text: str, fmt: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The column names found and ``(line number, record)`` per data row."""
    if fmt == "jsonl":
        rows, names = [], {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"Line {number} of {path} is not valid JSON ({err.msg}); write one JSON object "
                                 "per line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"Line {number} of {path} is a JSON {type(record).__name__}, not an object; write "
                                 'one object per line, e.g. {"text": "...", "label": "..."}.')
            names.update(dict.fromkeys(record))
            rows.append((number, record))
        return list(names), rows
    # TSV has no quoting: a field that starts with a quote keeps it (CSV quoting merged '"A" she said' into 'A she said')
    quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t", quoting=quoting)
    names = [n for n in (reader.fieldnames or []) if n is not None]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"The header of {path} names column {twice[0]!r} twice; give every column its own name.")
    rows = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):  # more or fewer fields than the header
            quote = ' (quote a text that holds a comma: "..., ...")' if fmt == "csv" else ""
            raise ValueError(f"Row at line {reader.line_num} of {path} has another number of fields than the header "
                             f"({len(names)}); fix the row{quote}.")
        rows.append((reader.line_num, row))
    return names, rows


def _value(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    return "" if value is None else " ".join(str(value).split())


def load_labeled_file(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                      label_words: str | Mapping[str, str] | None = None, instruction: str | None = None,
                      field: str = "Text") -> ICLTask:
    """Read a labeled file: CSV with a header row (``.csv``), TSV (``.tsv``/``.tab``) or JSON lines
    (``.jsonl``/``.ndjson``), with the text in ``text_column`` and the label in ``label_column``.

    Args:
        path: the file (UTF-8).
        text_column, label_column: the columns (CSV/TSV header names, JSONL field names).
        label_words: ``{label: word}`` (or ``"label=word,..."``) for every label; default: the labels themselves.
        instruction: the prompt's first line; default ``"Classify each text as one of: w1, w2, ..."``.
        field: the name each text is introduced with in the prompt (``"Text: ...\\nAnswer: w"``).

    Raises:
        ValueError: one line naming the problem and the fix (see the module docstring).
    """
    path = Path(path)
    _check_exists(path)  # before its extension: a missing file is not a format problem
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Data file {path} has extension {path.suffix or '(none)'!r}; use .csv (header row), "
                         ".tsv or .jsonl so the format is known.")
    names, rows = _rows(path, _read_text(path), fmt)
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in names:
            found = ", ".join(repr(n) for n in names) or "none"
            raise ValueError(f"Column {column!r} not found in {path} (columns found: {found}); pass {flag} NAME.")
    if not rows:
        raise ValueError(f"Data file {path} has a header but no examples; add one labeled example per row.")
    pairs = []
    for number, record in rows:
        text, label = _value(record, text_column), _value(record, label_column)
        if not text:
            raise ValueError(f"Row at line {number} of {path} has no text in column {text_column!r}; fill it or "
                             "remove the row.")
        if not label:
            raise ValueError(f"Row at line {number} of {path} has no label in column {label_column!r}; fill it or "
                             "remove the row.")
        pairs.append((text, label))
    labels = sorted({label for _, label in pairs})
    if len(labels) > 20 and len(labels) > len(pairs) / 2:  # free text, not classes
        raise ValueError(f"Column {label_column!r} of {path} has {len(labels)} different values in {len(pairs)} rows: "
                         "it holds text, not labels. Pass the label column's name with --label-column.")
    if len(labels) < 2:
        raise ValueError(f"Column {label_column!r} of {path} has one class ({labels[0]!r}); classification needs "
                         "at least two labels: add examples of another class or pick another --label-column.")
    words = parse_label_words(label_words)
    if words is None:
        words = {label: label for label in labels}
    missing = [label for label in labels if label not in words]
    if missing:
        raise ValueError(f"--label-words gives no word for label(s) {missing} of {path}; add LABEL=WORD for each "
                         f"of {labels}.")
    if len(set(words[label] for label in labels)) < len(labels):
        raise ValueError(f"--label-words maps two labels of {path} to the same word ({words}); give each label "
                         "its own word.")
    chosen = sorted(words[label] for label in labels)
    instruction = instruction or f"Classify each text as one of: {', '.join(chosen)}."
    return ICLTask(path.name, tuple((text, words[label]) for text, label in pairs), instruction, field)


def label_token_ids(tokenizer_ids: Any, labels: Sequence[str]) -> list[int]:
    """The first token id of ``" " + word`` for each label word; refuses labels whose first tokens collide.

    ``tokenizer_ids(text)`` returns the token ids of ``text`` without the sink (``lambda t:
    ml.strip_sink(ml.tokenize(t))``); the ``tokenize`` argument keeps this module model-free.
    """
    first: dict[int, str] = {}
    out = []
    for label in labels:
        ids = tokenizer_ids(" " + label)
        if not ids:
            raise ValueError(f"Label word {label!r} has no tokens; give it a word with --label-words.")
        if ids[0] in first:
            raise ValueError(f"Labels {first[ids[0]]!r} and {label!r} both start with the token #{ids[0]} for this "
                             "tokenizer, so they cannot be told apart; give them words that start differently with "
                             "--label-words (e.g. 'a=alpha,b=beta').")
        first[ids[0]] = label
        out.append(ids[0])
    return out


def unique_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """One ``(text, label)`` per text, the first (in order): a text the data gives twice, under any label, would be
    both a test sentence and a demonstration, or tested twice."""
    first: dict[str, tuple[str, str]] = {}
    for text, label in pairs:
        first.setdefault(text, (text, label))
    return list(first.values())


def check_sizes(task: ICLTask, *, n_test: int, shots: int, memory_demos: int) -> None:
    """Refuse sets the data cannot fill: disjoint, label-balanced test, prompt and memory sets per seed (a text
    given twice counts once, as :func:`unique_pairs` keeps it)."""
    pool = unique_pairs(task.pairs)
    n = len(pool)
    if n_test > n:
        raise ValueError(f"The test set ({n_test} sentences) is larger than the data ({task.name}: {n} examples); "
                         "lower --n-test.")
    need = n_test + shots + memory_demos
    if need > n:
        raise ValueError(f"{task.name} has {n} examples but the test, prompt and memory sets need {n_test} + "
                         f"{shots} + {memory_demos} = {need}; lower --n-test, --shots or --memory-demos.")
    labels = task.labels
    counts = {label: 0 for label in labels}
    for _, label in pool:
        counts[label] += 1
    # balanced draws take the sorted labels in turn: label j gives len(range(j, size, k)) examples to a set
    need_per = {label: sum(len(range(j, size, len(labels))) for size in (n_test, shots, memory_demos))
                for j, label in enumerate(labels)}
    short = {label: f"{counts[label]} < {need_per[label]}" for label in labels if counts[label] < need_per[label]}
    if short:
        raise ValueError(f"{task.name}: label-balanced sets of {n_test} test, {shots} prompt and {memory_demos} memory "
                         f"examples need more examples of some labels (have < need: {short}); lower the sizes or "
                         "add examples of those labels.")
