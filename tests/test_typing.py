"""The type hints are part of the API (PEP 561): the packages ship ``py.typed``, so a user's type checker reads
memlong's hints, and those hints must say what the documented calls return.

One mypy run (about a minute without a cache: it reads torch, transformers and both frameworks) checks the
examples and a typed client of the core API strictly, and a file of mistakes that must each be reported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CLIENT = '''
from __future__ import annotations

from typing_extensions import assert_type

from pathlib import Path

from memlong import MemLong, MemLongConfig, MemoryBank
from memlong.generation import Generation, GenerationStats
from memlong.memory import SearchHit


def answer(ml: MemLong, question: str) -> str:
    text = ml.generate(question, namespace="hamlet", max_new_tokens=8, stop=["\\n"])
    assert_type(text, str)
    g = ml.generate(question, namespace="hamlet", stream=True, temperature=0.7, seed=1)
    assert_type(g, Generation)
    assert_type(g.stats, GenerationStats)
    pieces: list[str] = list(g)
    either = ml.generate(question, stream=bool(pieces))
    assert_type(either, str | Generation)
    return text + g.text() + "".join(pieces)


def hits(bank: MemoryBank, question: str) -> list[str]:
    found = bank.search(question, namespace="hamlet", k=4)
    assert_type(found, list[SearchHit])
    return [h.chunk_id for h in found]


def documented_calls(bank: MemoryBank, vector: list[float]) -> list[str]:  # (API review: each failed --strict)
    MemLongConfig(retrieval_layers=[0, 1, 2], memory_path=Path("corpus.bank"), memory_dtype="bfloat16")
    found = bank.search(vector, namespace="hamlet", k=2, mode="dense")
    ids = tuple(h.chunk_id for h in found)
    return bank.following(ids, namespace="hamlet") + bank.stored(ids, namespace="hamlet")
'''

MISTAKES = {  # a line a type checker must refuse -> what its message names
    'ml.generate("q", namespce="hamlet")': "namespce",
    'ml.generate("q", max_new_tokens="8")': "No overload variant",
    'n: int = ml.generate("q")': "str",
    'ml.generate("q", stream=True).upper()': "upper",
    'MemLongConfig(memory_dtype="float17")': "memory_dtype",
}


def test_packages_ship_py_typed() -> None:
    """The marker files exist and the wheel carries them (package-data), or type checkers ignore every hint."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    data = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    for package in ("memlong", "memlong_integrations"):
        assert (ROOT / package / "py.typed").is_file()
        assert re.search(rf'^{package} = \[[^\]]*"py\.typed"', data, re.M), data


@pytest.mark.slow  # a minute of mypy
def test_user_code_type_checks(tmp_path: Path) -> None:
    (tmp_path / "client.py").write_text(textwrap.dedent(CLIENT), encoding="utf-8")
    body = "".join(f"    {line}\n" for line in MISTAKES)
    head = "from memlong import MemLong, MemLongConfig\n\n\ndef f(ml: MemLong) -> None:\n"
    (tmp_path / "mistakes.py").write_text(head + body, encoding="utf-8")
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.py"))
    assert examples
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # the source tree, as an installed package would be seen
    run = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
                          "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "client.py"),
                          str(tmp_path / "mistakes.py"), *examples],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert not run.stderr.strip(), run.stderr
    wrong = [line for line in errors if "mistakes.py" not in line]
    assert not wrong, "\n".join(wrong)  # the examples and the typed client pass --strict
    for number, (line, name) in enumerate(MISTAKES.items(), start=5):
        found = [e for e in errors if re.search(rf"mistakes\.py:{number}: error:", e)]
        assert found and any(name in e for e in found), f"mypy did not refuse {line!r}:\n{run.stdout}"


def test_the_license_ships():
    """Wheel review: Apache-2.0 was declared, but no license text was in the repository, the wheel or the sdist."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = "Apache-2.0"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert "Apache License\n                           Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
