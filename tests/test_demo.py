"""The demo's plant / ask path (memlong/demo.py) and its five-fact benchmark (benchmarks/demo_facts.py)."""

import json
import sys
from pathlib import Path

import pytest

from memlong.demo import FACT, SAFFRON, DemoFact, ask_fact, plant_fact, run_demo
from memlong.prompts import PLAIN_STOP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TEXT = "\n".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(60))
HORSE = DemoFact("The favourite horse of the young prince is a grey mare named Tindra from the valley of Osk.",
                 "What is the favourite horse of the young prince?", "The favourite horse of the young prince is", "Tindra")


def test_plant_fact_puts_the_sentence_on_its_own_line_at_the_depth():
    planted = plant_fact(TEXT, 0.3, HORSE)
    at = planted.index(HORSE.sentence)
    assert planted.replace(f"\n{HORSE.sentence}\n", "", 1) == TEXT  # nothing else changed
    assert planted[at - 1] == "\n" and planted[at + len(HORSE.sentence)] == "\n"
    assert 0.25 < at / len(planted) <= 0.31
    assert plant_fact(TEXT) == plant_fact(TEXT, 0.5, SAFFRON) and FACT.strip() in plant_fact(TEXT)  # the demo's
    no_breaks = "word " * 100
    assert plant_fact(no_breaks, 0.5, HORSE).index(HORSE.sentence) == 251  # at the depth itself, not at the end


def test_demo_fact_checks_the_answer_word():
    assert HORSE.contains(" a grey mare named TINDRA.") and not HORSE.contains(" a grey mare.")


@pytest.mark.parametrize("top_k", [0, 2, 64])
def test_ask_fact_reports_the_rank_of_the_facts_chunk(make_tiny, top_k):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=top_k)
    ml.ingest(plant_fact(TEXT, 0.5, HORSE), namespace="demo", progress=False)
    hits = [h.chunk_id for h in ml.bank.search(HORSE.question, namespace="demo", k=top_k)] if top_k else []
    asked = ask_fact(ml, HORSE, namespace="demo", max_new_tokens=4, echo=False)
    assert set(asked) == {"answer", "answer_contains_fact", "fact_chunk_rank", "stats"}
    # what generate retrieved, in retrieval order (best first): the public stats are enough to rank the fact's chunk
    assert asked["stats"].chunk_ids == hits
    holding = [i for i, c in enumerate(hits, start=1) if "Tindra" in ml.bank.get(c, namespace="demo").text]
    assert asked["fact_chunk_rank"] == (holding[0] if holding else None)
    if top_k == 0:
        assert asked["fact_chunk_rank"] is None and asked["stats"].memory_tokens == 0
    if top_k == 64:  # every chunk retrieved: the fact's chunk is among them
        assert asked["fact_chunk_rank"] is not None
    assert asked["answer_contains_fact"] == HORSE.contains(asked["answer"])


def test_ask_fact_prints_the_question_and_streamed_answer(make_tiny, capsys):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    ml.ingest(plant_fact(TEXT, 0.5, HORSE), namespace="demo", progress=False)
    calls, generate = [], ml.generate
    ml.generate = lambda *a, **k: calls.append(k) or generate(*a, **k)
    asked = ask_fact(ml, HORSE, namespace="demo", max_new_tokens=4)
    out = capsys.readouterr().out
    assert f"Q: {HORSE.question}\nA: {HORSE.answer_prefix}{asked['answer']}" in out
    # the answer ends at a blank line or the next question (it ran on into the play: "...Zanthe.\n\nQueen.")
    assert calls[0]["stop"] == PLAIN_STOP


def test_run_demo_keeps_its_summary_and_says_whether_the_answer_contains_the_fact(make_tiny, tmp_path, capsys):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    ml.ingest(plant_fact(TEXT), namespace="demo", progress=False)  # a small saved memory stands in for the play
    ml.save_memory(tmp_path / "memory", namespaces=["demo"])
    ml.reset("demo")
    summary = run_demo(ml, load_memory=str(tmp_path / "memory"), max_new_tokens=4, progress=False)
    assert list(summary)[:13] == ["tokens_ingested", "chunks", "memory_tokens", "memory_mb", "load_s", "ingest_s",
                                  "ingest_tokens_per_s", "prompt_tokens_encoded", "memory_tokens_attended",
                                  "fact_chunk_retrieved", "answer_mentions_saffron", "time_to_first_token_s",
                                  "generate_s"]  # the keys `memlong demo --json` always wrote, in their order
    import os
    import re

    cli_md = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cli.md")).read()
    documented = re.search(r"`\{([^}]*)\}` for the demo", " ".join(cli_md.split())).group(1)
    assert [k.strip().strip('"') for k in documented.split(",")] == list(summary)  # docs/cli.md lists them all
    assert summary["answer_mentions_saffron"] == ("saffron" in summary["answer"].lower())
    assert summary["fact_chunk_retrieved"] == (summary["fact_chunk_rank"] is not None)
    out = capsys.readouterr().out
    verdict = "contains" if summary["answer_mentions_saffron"] else "does NOT contain"
    assert f"The answer {verdict} the planted fact ('saffron')" in out


def test_run_demo_refuses_memory_saved_from_another_play(make_tiny, tmp_path):
    """Review finding: `memlong demo --play hamlet --load-memory DIR` with DIR saved from another play announced
    Hamlet and answered from the other play's memory."""
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    ml.ingest(plant_fact(TEXT), namespace="demo", progress=False, metadatas=[{"play": "macbeth"}])  # as run_demo does
    ml.save_memory(tmp_path / "memory", namespaces=["demo"])
    ml.reset("demo")
    with pytest.raises(ValueError, match="holds the memory of macbeth, not hamlet: give --play macbeth"):
        run_demo(ml, play="hamlet", load_memory=str(tmp_path / "memory"), max_new_tokens=2, progress=False)
    ml.reset("demo")
    assert run_demo(ml, play="macbeth", load_memory=str(tmp_path / "memory"), max_new_tokens=2, progress=False)


def test_demo_facts_slices_keep_the_fact_at_its_depth():
    import demo_facts

    five = demo_facts.facts()
    assert len({f.answer_word for f in five}) == 5 and all(f.sentence.count(f.answer_word) == 1 for f in five)
    for fact, play, depth in zip(five, demo_facts.PLAYS, demo_facts.DEPTHS):
        text = demo_facts.document(play, depth, fact, tiny=True)
        assert len(text) == demo_facts.TINY_CHARS + len(fact.sentence) + 2 and text.count(fact.sentence) == 1
        assert abs(text.index(fact.sentence) / len(text) - depth) < 0.01
    with pytest.raises(SystemExit):
        demo_facts.parse_args(["--facts", "3", "--plays", "hamlet,macbeth"])
    with pytest.raises(SystemExit):
        demo_facts.parse_args(["--depths", "0.2,1.0,0.5,0.6,0.7"])


@pytest.mark.slow
def test_demo_facts_tiny_run_records_and_checks_every_answer(tmp_path, capsys):
    """Two facts on 24,000-character slices with `memlong demo`'s settings (~1.5 min on 2 cores)."""
    import demo_facts

    out = tmp_path / "facts.json"
    assert demo_facts.main(["--tiny", "--facts", "2", "--no-progress", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["config"]["settings"]["kv_reencode_head"] == 32 and saved["config"]["settings"]["top_k"] == 4
    records = saved["records"]
    assert [(r["play"], r["depth"]) for r in records] == [("hamlet", 0.2), ("macbeth", 0.35)]
    for r, fact in zip(records, demo_facts.facts()):
        assert r["answer_contains_fact"] == fact.contains(r["answer"])  # the answer is checked, not assumed
        assert r["fact_chunk_retrieved"] == (r["fact_chunk_rank"] is not None)
        assert r["fact_chunk_rank"] is None or 1 <= r["fact_chunk_rank"] <= r["retrieved_chunks"] == 4
        assert r["fact_chunk_stored"] and r["tokens"] > 4 * 1024 and r["time_to_first_token_s"] > 0
        assert 0 < r["reencoded_tokens"] <= 32 * r["retrieved_chunks"]  # each chunk's first 32 tokens (EPIC)
        assert r["pasted_contains_fact"] == fact.contains(r["pasted_answer"]) and r["pasted_answer"].strip()
    summary = saved["summary"]
    assert summary["answered"] == sum(r["answer_contains_fact"] for r in records)
    assert summary["pasted_answered"] == sum(r["pasted_contains_fact"] for r in records)
    assert summary["retrieval_misses"] + summary["reading_misses"] == 2 - summary["answered"]
    assert f"Answered {summary['answered']} of 2" in capsys.readouterr().out
