"""Per-trial diagnostics of the evaluations: where the needle was, whether retrieval or reading missed (issue 15)."""

import pytest

from memlong.evaluation import describe_misses, fact_rank, miss_counts, passkey

FILLER = " ".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(80))


def test_fact_rank_is_the_first_retrieved_text_holding_the_needle():
    texts = ["no key here", "the pass key is 41230.", "41230 again"]
    assert fact_rank(texts, "41230") == 2
    assert fact_rank(texts, "99999") is None
    assert fact_rank([], "41230") is None


def test_miss_counts_split_failures_by_cause():
    trials = [{"correct": False, "needle_seen": False}, {"correct": False, "needle_seen": True},
              {"correct": False, "needle_seen": True}, {"correct": True, "needle_seen": True}]
    counts = miss_counts(trials)
    assert counts == {"retrieval": 1, "reading": 2}
    assert describe_misses(counts) == "1 retrieval miss, 2 reading misses"
    assert describe_misses({"retrieval": 3, "reading": 1}, window=True) == "3 outside the window, 1 reading miss"


def _check_trials(record, trials):
    assert record["trials"] == trials == len(record["per_trial"])
    for t in record["per_trial"]:
        assert set(t) == {"depth", "key", "answer", "correct", "key_nll", "needle_seen", "needle_rank"}
        assert 0.0 <= t["depth"] < 1.0 and len(t["key"]) == 5 and t["key"].isdigit()
        assert isinstance(t["answer"], str) and t["key_nll"] > 0
    correct = sum(t["correct"] for t in record["per_trial"])
    assert record["accuracy"] == correct / trials
    # every failed trial is counted once, under one cause
    assert record["retrieval_misses"] + record["reading_misses"] == trials - correct
    assert record["failed"] == describe_misses({"retrieval": record["retrieval_misses"],
                                                "reading": record["reading_misses"]}, window=record["mode"] == "window")


def test_passkey_records_a_retrieval_miss_when_nothing_is_retrieved(make_tiny):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=0)  # retrieval forced to miss: no chunk is read
    (record,) = passkey(ml, lengths=[256], trials=3, filler=FILLER, modes=("memlong",), progress=False)
    _check_trials(record, 3)
    assert all(t["needle_rank"] is None and t["needle_seen"] is False for t in record["per_trial"])
    assert record["reading_misses"] == 0
    assert record["retrieval_misses"] == sum(not t["correct"] for t in record["per_trial"]) > 0
    assert record["failed"].startswith(f"{record['retrieval_misses']} retrieval miss")


def test_passkey_records_the_needles_rank_when_it_is_retrieved(make_tiny):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=32)  # every chunk of a 256-token haystack
    records = passkey(ml, lengths=[256], trials=3, filler=FILLER, progress=False)
    by_mode = {r["mode"]: r for r in records}
    assert set(by_mode) == {"window", "full", "memlong"}
    for record in records:
        _check_trials(record, 3)
    memlong, full = by_mode["memlong"], by_mode["full"]
    assert [t["depth"] for t in memlong["per_trial"]] == [t["depth"] for t in full["per_trial"]]  # same trials
    assert all(t["needle_seen"] and 1 <= t["needle_rank"] <= 32 for t in memlong["per_trial"])
    assert memlong["retrieval_misses"] == 0  # a random-weight model fails by reading, never by retrieval here
    assert all(t["needle_seen"] and t["needle_rank"] is None for t in full["per_trial"])
    # the 64-token window holds the needle only when it sits near the end of the haystack
    window = by_mode["window"]["per_trial"]
    assert all(t["needle_rank"] is None for t in window)
    assert all(not t["needle_seen"] for t in window if t["depth"] < 0.5)
    assert any(t["needle_seen"] for t in window) and not all(t["needle_seen"] for t in window)  # this seed: both


@pytest.mark.parametrize("modes", [("memlong", "nonsense")])
def test_passkey_refuses_an_unknown_mode_before_any_work(make_tiny, modes):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    with pytest.raises(ValueError, match="Unknown mode 'nonsense'"):
        passkey(ml, lengths=[128], trials=1, filler=FILLER, modes=modes, progress=False)
