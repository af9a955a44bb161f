"""Every fenced code block in README.md and docs/*.md is executed, so the examples cannot rot.

Conventions (markers are HTML comments on the lines right above a fence; a reader of the rendered page does not
see them):

* Only ``python`` and ``bash`` fences are allowed.
* **python** blocks run. All python blocks of one file run in order, in one namespace, in one fresh
  subprocess (so a later block may continue an earlier one; a block that fails does not stop the next). The
  working directory is a scratch folder: files an example writes (``memory/...``, ``runs/...``) land there.
* **bash** blocks run command by command (``a && b`` is two commands; ``\\`` continues a line) in a scratch
  folder where ``benchmarks/``, ``memlong/`` ... are links into the repository and ``results/`` is empty, so a
  reproducing command never overwrites a committed result. ``pip install`` commands are not run here: each
  must be one that ``.ci/run`` runs (CI installs from there, on a fresh machine).
* ``<!-- docs-test: expect "TEXT" -->``: the block's output must contain TEXT (case-insensitive). Repeatable.
  A block that prints a model's answer must carry one (checked), so a wrong answer fails the test.
* ``<!-- docs-test: help-only (REASON) -->``: bash commands run with ``--help`` appended (the reason says why,
  e.g. an 11-minute benchmark); every ``--flag`` of the command must appear in the help text, and ``memlong``
  commands must also parse with the CLI's own parser.
* ``<!-- docs-test: not-run (REASON) -->``: not executed (e.g. needs a GPU); the reason is required, and a python
  block is still compiled. Nothing is skipped silently: an unmarked block runs.
* ``<!-- docs-test: pending-adapters -->``: the block runs and must pass. While the LangChain / LlamaIndex
  adapter fix is pending, ``MEMLONG_DOCS_ALLOW_PENDING=1`` turns its failure into a skip that names the failure;
  once it passes, the marker must go (a passing block that still carries it fails).

Module marked ``slow``: it loads the default model (one process per file). The marker checks
(``test_block_markers``) are cheap and run in the quick loop too (``-m "not slow"`` keeps only them).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PENDING_ENV = "MEMLONG_DOCS_ALLOW_PENDING"
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
ANSWER_CALLS = re.compile(r"\.(generate|query|invoke|stream|complete|chat)\(")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    expect: list[str] = field(default_factory=list)
    help_only: str | None = None
    not_run: str | None = None
    pending: bool = False
    bad_markers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}-{self.lang or 'plain'}"


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file with the docs-test markers just above each."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path}:{i + 1}: unclosed code fence"
        block = Block(path, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n")
        j = start - 1
        while j >= 0 and (lines[j].strip() == "" or lines[j].lstrip().startswith("<!--")):  # comments right above
            for text in MARKER.findall(lines[j]):
                _apply_marker(block, text)
            j -= 1
        blocks.append(block)
        i = end + 1
    return blocks


def _apply_marker(block: Block, text: str) -> None:
    if m := re.fullmatch(r'expect\s+"(.+)"', text):
        block.expect.append(m.group(1))
    elif m := re.fullmatch(r"help-only\s*\((.+)\)", text):
        block.help_only = m.group(1)
    elif m := re.fullmatch(r"not-run\s*\((.+)\)", text):
        block.not_run = m.group(1)
    elif text == "pending-adapters":
        block.pending = True
    else:
        block.bad_markers.append(text)


BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)]


def test_docs_have_blocks():
    assert len(DOC_FILES) > 5 and len(BLOCKS) > 10


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_block_markers(block: Block):
    """Cheap checks, in the quick loop too: every block is one this test knows how to run, or says why not."""
    assert not block.bad_markers, f"unknown docs-test marker(s): {block.bad_markers}"
    assert block.lang in ("python", "bash"), f"{block.name}: fence language must be python or bash, not {block.lang!r}"
    assert not (block.help_only and block.lang != "bash"), "help-only applies to bash blocks"
    assert not (block.help_only and block.not_run), "help-only or not-run, not both"
    if block.lang == "python":
        compile(block.code, block.name, "exec")
        if not block.not_run and "print(" in block.code and ANSWER_CALLS.search(block.code):
            assert block.expect, f"{block.name} prints a model's answer: add <!-- docs-test: expect \"...\" -->"


# ----------------------------------------------------------------------------------------------------------------
# running

_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _scratch() -> Path:
    """A fresh working directory with links to the repository's folders and an empty results/."""
    tmp = tempfile.TemporaryDirectory(prefix="memlong-docs-")
    _SCRATCH.append(tmp)
    root = Path(tmp.name)
    for name in ("benchmarks", "memlong", "memlong_integrations", "notebooks", "tests", "pyproject.toml", ".ci"):
        if (ROOT / name).exists():
            os.symlink(ROOT / name, root / name)
    (root / "results").mkdir()
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python`, `memlong`: this env
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    blocks = json.load(open(sys.argv[1]))
    namespace, results = {"__name__": "__main__"}, {}

    class Tee(io.StringIO):
        def write(self, s):
            sys.__stdout__.write(s)
            return super().write(s)

    for block in blocks:
        out = Tee()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block["code"], block["name"], "exec"), namespace)
            results[block["name"]] = {"ok": True, "output": out.getvalue()}
        except BaseException:
            results[block["name"]] = {"ok": False, "output": out.getvalue(), "error": traceback.format_exc()}
        json.dump(results, open(sys.argv[2], "w"))
""")


@functools.cache
def _run_python_file(path: Path) -> dict:
    """Run every python block of ``path`` that is not marked not-run, in order, in one namespace."""
    blocks = [b for b in BLOCKS if b.path == path and b.lang == "python" and not b.not_run]
    work = _scratch()
    (work / "blocks.json").write_text(json.dumps([{"name": b.name, "code": b.code} for b in blocks]))
    proc = subprocess.run([sys.executable, "-c", _DRIVER, "blocks.json", "results.json"], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=1500)
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    for b in blocks:  # a crash of the interpreter itself leaves the remaining blocks without a result
        results.setdefault(b.name, {"ok": False, "output": "", "error": f"process exited {proc.returncode}:\n"
                                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"})
    return results


def _commands(code: str) -> list[str]:
    """Simple commands of a bash block: comments dropped, ``\\`` continuations joined, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.split("\n"):
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
        commands += [c.strip() for c in line.split(" && ") if c.strip()]
    return commands


def _pip_key(argv: list[str]) -> tuple[str, ...] | None:
    """A pip install command, normalised: ``python -m pip`` = ``pip``, quiet flags dropped; None if not pip."""
    if argv[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        argv = ["pip", *argv[3:]]
    if argv[:2] != ["pip", "install"]:
        return None
    return tuple(a for a in argv if a not in ("-q", "--quiet"))


def _ci_pip_commands() -> set[tuple[str, ...]]:
    keys = set()
    for command in _commands((ROOT / ".ci" / "run").read_text()):
        key = _pip_key(shlex.split(command))
        if key:
            keys.add(key)
            keys.add(tuple("." if a == ".[test]" else a for a in key))  # `pip install -e .` is covered by .[test]
    return keys


def _run_bash(block: Block) -> tuple[bool, str]:
    work, output, ok = _scratch(), [], True
    ci = _ci_pip_commands()
    for command in _commands(block.code):
        argv = shlex.split(command)
        if _pip_key(argv):
            if _pip_key(argv) not in ci:
                return False, f"{command!r} is not one of .ci/run's installs (CI runs those on a fresh machine)"
            output.append(f"$ {command}  [not run: .ci/run installs the same]")
            continue
        if block.help_only:
            if argv[0] == "memlong":
                from memlong.cli import build_parser

                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit as exc:
                    return False, f"{command!r} does not parse with memlong's CLI parser (exit {exc.code})"
            command = command + " --help"
        proc = subprocess.run(command, shell=True, cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
        output.append(f"$ {command}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            return False, "\n".join(output) + f"\n(exit {proc.returncode})"
        if block.help_only:
            missing = [f for f in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", " ".join(argv)) if f not in proc.stdout]
            if missing:
                return False, "\n".join(output) + f"\nflags not in the help text: {missing}"
    return ok, "\n".join(output)


RUNNABLE = [b for b in BLOCKS if b.lang in ("python", "bash")]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_block_runs(block: Block):
    if block.not_run:  # declared, with its reason, beside the block; compiled by test_block_markers
        assert block.not_run.strip(), "not-run needs a reason"
        return
    if block.lang == "python":
        result = _run_python_file(block.path)[block.name]
        ok, output = result["ok"], result["output"] + result.get("error", "")
    else:
        ok, output = _run_bash(block)
    missing = [e for e in block.expect if e.lower() not in output.lower()]
    failure = None if ok and not missing else (
        f"{block.name} failed:\n{output[-4000:]}" if not ok else
        f"{block.name}: output lacks the expected {missing}:\n{output[-4000:]}")
    if block.pending:
        if failure is None:
            pytest.fail(f"{block.name} passes now: remove its <!-- docs-test: pending-adapters --> marker")
        if os.environ.get(PENDING_ENV) == "1":
            pytest.skip(f"pending-adapters ({PENDING_ENV}=1), still failing: {failure[:800]}")
    if failure:
        pytest.fail(failure)


def teardown_module():
    for tmp in _SCRATCH:
        shutil.rmtree(tmp.name, ignore_errors=True)
