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


# ------------------------------------------------------------------------------------------ the RAG benchmarks
def _benchmarks():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rag_langchain
    import rag_llama_index

    return rag_langchain, rag_llama_index


def _answer(correct):
    return {"answer": "x", "correct": correct, "prompt_tokens": 20, "memory_tokens": 512, "time_to_first_token": 0.1,
            "tokens_encoded": 20, "llm_calls": 1, "query_seconds": 0.2, "chunk_ids": ["a"]}


def test_rag_summaries_split_failures_into_retrieval_and_reading_misses():
    rag_langchain, rag_llama_index = _benchmarks()
    # (fact retrieved, K-V right, pasted right): one retrieval miss and two reading misses for K-V
    cases = [(False, False, False), (True, False, True), (True, False, False), (True, True, True)]
    lc = [{"fact_retrieved": f, "fact_rank": 1 if f else None, "kv": _answer(k), "paste": _answer(p)} for f, k, p in cases]
    rows = {r["mode"]: r for r in rag_langchain.summarise(lc, ["kv", "paste"])}
    assert (rows["kv"]["retrieval_misses"], rows["kv"]["reading_misses"]) == (1, 2)
    assert (rows["paste"]["retrieval_misses"], rows["paste"]["reading_misses"]) == (1, 1)
    assert rag_langchain.failure_lines(list(rows.values()))[0] == "kv: 3/4 wrong: 1 retrieval miss, 2 reading misses"
    li = [{"fact_retrieved": f, "fact_rank": 1 if f else None, "kv": _answer(k), "text": _answer(p)} for f, k, p in cases]
    summary = rag_llama_index.summarise(li, ["kv", "text"])
    assert (summary["kv"]["retrieval_misses"], summary["kv"]["reading_misses"]) == (1, 2)
    assert rag_llama_index.failure_lines(summary)[1].endswith("2/4 wrong: 1 retrieval miss, 1 reading miss")
    # a refine call that turns a right first answer wrong is counted against the final answer, and said
    li[2]["text"].update(llm_calls=2, first_call_correct=True)
    summary = rag_llama_index.summarise(li, ["kv", "text"])
    assert (summary["text"]["accuracy_of_first_call"], summary["text"]["accuracy"]) == (0.75, 0.5)
    assert rag_llama_index.failure_lines(summary)[2].endswith("first LLM call 75%, of the final answer after the "
                                                              "refine calls 50%")


def test_llama_index_fact_rank_follows_the_retrieval_scores():
    from llama_index.core.schema import NodeWithScore, TextNode

    _, rag_llama_index = _benchmarks()
    nodes = [NodeWithScore(node=TextNode(text=t), score=s) for t, s in
             [("early text", 0.2), ("the keeper is Hester Vane", 0.5), ("more", 0.9)]]  # document order, not rank
    assert rag_llama_index.fact_rank_of(nodes, "Hester Vane") == 2
    assert rag_llama_index.fact_rank_of(nodes, "Tobias Wren") is None


@pytest.mark.slow
def test_rag_langchain_records_the_facts_rank_and_answers(tmp_path):
    rag_langchain, _ = _benchmarks()
    out = tmp_path / "lc.json"
    assert rag_langchain.main(["--facts", "2", "--plays", "macbeth", "--chars", "4000", "--top-k", "2", "--modes",
                               "kv,paste", "--max-new-tokens", "4", "--no-progress", "--json", str(out)]) == 0
    import json

    saved = json.loads(out.read_text())
    for record in saved["records"]:
        assert record["fact_retrieved"] == (record["fact_rank"] is not None)
        assert record["fact_rank"] in (None, 1, 2)
        assert all(isinstance(record[m]["answer"], str) for m in ("kv", "paste"))
    for row in saved["summary"]:
        wrong = sum(not r[row["mode"]]["correct"] for r in saved["records"])
        assert row["retrieval_misses"] + row["reading_misses"] == wrong


@pytest.mark.slow
def test_rag_llama_index_records_the_facts_rank_and_answers(tmp_path, capsys):
    _, rag_llama_index = _benchmarks()
    out = tmp_path / "li.json"
    assert rag_llama_index.main(["--facts", "2", "--plays", "macbeth", "--chars", "4000", "--top-k", "2", "--no-chat",
                                 "--max-new-tokens", "4", "--no-progress", "--json", str(out)]) == 0
    import json

    saved = json.loads(out.read_text())
    for record in saved["records"]:
        assert record["fact_retrieved"] == (record["fact_rank"] is not None) and record["fact_rank"] in (None, 1, 2)
    for name in ("kv", "text"):
        for record in saved["records"]:  # each LLM call's own answer; the last one is the response
            calls = record[name]["call_answers"]
            assert len(calls) == record[name]["llm_calls"] and calls[-1].strip() == record[name]["answer"].strip()
        wrong = sum(not r[name]["correct"] for r in saved["records"])
        assert saved["summary"][name]["retrieval_misses"] + saved["summary"][name]["reading_misses"] == wrong
    assert "wrong:" in capsys.readouterr().out


def test_a_window_trial_whose_question_fills_the_window_reads_no_document(make_tiny):
    """Review finding: ``doc_ids[-(window - len(question)):]`` was ``doc_ids[-0:]`` (the whole document) when the
    question filled the window."""
    from memlong.evaluation import _trial_input

    ml, _ = make_tiny(local_window=64, chunk_size=16)
    doc, question = list(range(5, 500)), list(range(600, 664))
    assert _trial_input(ml, "window", doc, question, 500, "12345")[0] == question
    assert _trial_input(ml, "window", doc, question[:14], 500, "12345")[0] == doc[-50:] + question[:14]
