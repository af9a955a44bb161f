"""In-context learning evaluation: real data from the registry wheels, conditions run end to end on the tiny model."""

import math

import pytest

from memlong.icl import CONDITIONS, icl_eval, load_task, summarize


@pytest.mark.parametrize("task, labels, at_least", [
    ("sentiment", {"positive", "negative"}, 10_000),
    ("topic", {"business", "entertainment", "politics", "sport", "technology"}, 1_500),
])
def test_load_task_reads_real_labeled_data(task, labels, at_least):
    data = load_task(task)
    assert len(data) >= at_least
    assert {label for _, label in data} == labels
    assert all(text.strip() and "\n" not in text for text, _ in data)


def test_unknown_task_and_condition_are_refused(make_tiny):
    with pytest.raises(ValueError, match="Unknown ICL task"):
        load_task("poetry")
    ml, _ = make_tiny()
    with pytest.raises(ValueError, match="Unknown ICL conditions"):
        icl_eval(ml, task="sentiment", conditions=("few_shot",), n_test=2, seeds=(0,), progress=False)


def test_icl_eval_runs_every_condition_and_cleans_up_memory(make_tiny):
    ml, _ = make_tiny(top_k=2)
    records = icl_eval(ml, task="topic", shots=5, memory_demos=30, n_test=10, seeds=(0, 1), progress=False)
    assert [(r["seed"], r["condition"]) for r in records] == [(s, c) for s in (0, 1) for c in CONDITIONS]
    for r in records:
        assert r["n"] == 10 and 0 <= r["correct"] <= 10 and r["accuracy"] == r["correct"] / 10
    assert {r["memory_demos"] for r in records if r["condition"] == "prompt+memory"} == {30}
    assert not [ns for ns in ml.bank.namespaces() if ns.startswith("_icl")]  # scratch memory was reset


def test_summarize_mean_spread_and_wilson_interval():
    records = [{"task": "t", "condition": "c", "seed": s, "accuracy": a, "correct": int(a * 50), "n": 50}
               for s, a in enumerate([0.6, 0.7, 0.8])]
    (row,) = summarize(records)
    assert row["accuracy"] == pytest.approx(0.7) and row["std"] == pytest.approx(0.1)
    assert row["n"] == 150 and row["ci95_low"] < 0.7 < row["ci95_high"]
    assert row["ci95_high"] - row["ci95_low"] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 150), rel=0.05)
