"""The runnable examples in ``examples/`` (the README's examples) run on the default model and answer right:
each printed answer contains its fact, not only runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memlong.evaluation import planted_fact_documents

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def run_example(name: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's packages, not an install
    out = subprocess.run([sys.executable, str(REPO / "examples" / name)], env=env, capture_output=True, text=True,
                         timeout=1200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def line(stdout: str, start: str) -> str:
    return next(x for x in stdout.splitlines() if x.startswith(start))


def fact(play: str) -> str:
    return planted_fact_documents(1, plays=(play,), chars=3000, distinct=True)[1][0].answer


def test_quickstart_answers_its_fact():
    assert fact("hamlet") in line(run_example("quickstart.py"), "answer:")


def test_langchain_rag_answers_its_fact():
    stdout = run_example("langchain_rag.py")
    assert "Tobias Wren" in line(stdout, "answer:")
    assert "tower" in line(stdout, "sources:")


def test_llama_index_rag_answers_its_fact_through_both_engines():
    stdout = run_example("llama_index_rag.py")
    assert fact("macbeth") in line(stdout, "K-V answer:")
    assert fact("macbeth") in line(stdout, "text answer:")
