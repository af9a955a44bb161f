"""End-to-end on the real embedded default model (SmolLM2-135M-Instruct) and the real MiniLM retriever."""

import json

import pytest
import torch

from memlong.cli import main
from memlong.evaluation import shakespeare_text

pytestmark = pytest.mark.slow

FACT = "\nThe secret ingredient of the royal cake is purple saffron from the island of Zanthe.\n"


def test_planted_fact_is_answered_from_memory(default_memlong):
    ml = default_memlong
    play = shakespeare_text("macbeth")[:20_000]
    cut = play.rfind("\n", 0, 9_000)
    ml.reset("e2e")
    stats = ml.ingest(play[:cut] + FACT + play[cut:], namespace="e2e", progress=False)
    assert stats.tokens > 4 * ml.config.local_window  # far more than the window: the fact must come from memory
    question = "What is the secret ingredient of the royal cake?"
    # a plain continuation prompt: the retrieved play text flows straight into it (see README, "prompts")
    answer = ml.generate(f"\nQuestion: {question}\nAnswer:", query=question, namespace="e2e",
                         answer_prefix=" The secret ingredient of the royal cake is", max_new_tokens=16)
    gen = ml.last_generation
    retrieved = [ml.bank.get(c, namespace="e2e").text for c in gen.chunk_ids]
    assert any("purple saffron" in text for text in retrieved)
    assert "saffron" in answer.lower()
    assert gen.prompt_tokens < 40  # only the question was encoded, the play came in as K-V
    assert gen.memory_tokens == sum(ml.bank.get(c, namespace="e2e").n_tokens for c in gen.chunk_ids)
    ml.reset("e2e")


def test_cli_eval_ppl_writes_records(tmp_path, default_memlong):
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text("tempest")[:16_000])
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--file", str(text), "--score-last", "256", "--no-progress", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["mode"] for r in records] == ["window", "full", "memlong"]
    for record in records:
        assert set(record) >= {"mode", "tokens", "scored_tokens", "ppl"}
        assert record["scored_tokens"] == 256 and 1 < record["ppl"] < 1000


def test_cli_eval_passkey_writes_records(tmp_path, capsys):
    out = tmp_path / "passkey.json"
    assert main(["eval", "passkey", "--lengths", "1536", "--trials", "1", "--top-k", "4", "--no-progress",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {r["mode"] for r in records} == {"window", "full", "memlong"}
    for record in records:
        assert set(record) >= {"mode", "length", "accuracy", "trials", "retrieval_misses", "reading_misses", "failed"}
        assert record["length"] == 1536 and record["trials"] == 1 and 0.0 <= record["accuracy"] <= 1.0
        (trial,) = record["per_trial"]
        assert trial["correct"] == (record["accuracy"] == 1.0)
        assert not trial["correct"] or trial["key"] in trial["answer"]
        assert record["retrieval_misses"] + record["reading_misses"] == 1 - trial["correct"]
    table = capsys.readouterr().out
    assert "| failed" in table and "reading miss" in table


def test_cli_reports_bad_input(tmp_path, capsys):
    short = tmp_path / "short.txt"  # (an empty file is refused before the model loads: tests/test_cli.py)
    short.write_text("Hi.")
    assert main(["eval", "ppl", "--file", str(short), "--no-progress"]) == 2
    assert "needs more than score_last" in capsys.readouterr().err


def test_planted_fact_documents_are_deterministic_and_contain_every_fact():
    from memlong.evaluation import planted_fact_documents

    docs, facts = planted_fact_documents(12, plays=("macbeth", "tempest"), chars=15_000, seed=3)
    again, facts2 = planted_fact_documents(12, plays=("macbeth", "tempest"), chars=15_000, seed=3)
    assert docs == again and facts == facts2
    assert len({f.question for f in facts}) == 12
    for fact in facts:
        assert docs[fact.document].count(fact.sentence) == 1
        assert fact.correct(f"{fact.answer_prefix} {fact.answer}.") and not fact.correct("nothing here")
    # the same seed gives the same facts across versions (results/ and the tests were built on them)
    _, pinned = planted_fact_documents(2, plays=("macbeth",), chars=3000)
    assert [(f.answer, round(f.depth, 4)) for f in pinned] == [("Edmund Hale", 0.4505), ("Cornelius Pike", 0.3353)]


def test_distinct_planted_facts_have_their_own_answers_and_spaced_depths():
    from memlong.evaluation import answer_key, planted_fact_documents

    docs, facts = planted_fact_documents(30, plays=("macbeth", "hamlet", "othello"), chars=20_000, distinct=True)
    assert len({f.answer for f in facts}) == 30  # no answer repeats
    for d in range(3):
        depths = sorted(f.depth for f in facts if f.document == d)
        assert all(b - a > 0.9 / len(depths) / 2 for a, b in zip(depths, depths[1:]))  # at least half a slot apart
        assert all(docs[d].count(f.sentence) == 1 for f in facts if f.document == d)
    assert answer_key(" Matilda Crane, the old keeper.") == answer_key("matilda crane.") == "matilda crane"
    assert answer_key(" Matilda Crane, the old keeper.", clause=False) == "matilda crane old keeper"


@pytest.mark.slow
def test_packaged_shakespeare_adapter_loads_and_lowers_held_out_perplexity(default_memlong):
    from memlong import MemLong
    from memlong.adapter import read_adapter_config

    meta = read_adapter_config("shakespeare")
    assert "tempest" in meta["data"]["held_out"] and "tempest" not in meta["data"]["train"]
    text = shakespeare_text("tempest")[:14_000]  # held out: never trained on
    trained = MemLong.from_pretrained("default", adapter="shakespeare", top_k=4, embedder=default_memlong.bank.embedder)
    assert (trained.config.kv_source, trained.config.position_layout) == ("memory_layer", "zero")
    stock = MemLong.from_pretrained("default", kv_source="memory_layer", position_layout="zero", top_k=4,
                                   embedder=default_memlong.bank.embedder)
    # the adapter's changes stay in the layers above the memory layer
    changed = {n.split(".")[2] for n, p in trained.model.named_parameters()
               if not torch.equal(p, dict(stock.model.named_parameters())[n])}
    assert changed and all(int(layer) > trained.config.memory_layer for layer in changed)
    with_adapter = trained.perplexity(text, score_last=1024)["ppl"]
    without = stock.perplexity(text, score_last=1024)["ppl"]
    assert with_adapter < 0.9 * without, (with_adapter, without)


def test_an_option_that_conflicts_with_an_adapters_settings_names_the_adapter(monkeypatch):
    """Matrix review: ``from_pretrained(adapter="shakespeare", kv_refresh=0.5)`` said to use per_layer / 'all' /
    continual "(the defaults)": fields the user never set (the adapter did). Refused before the weights load."""
    import transformers

    from memlong import MemLong

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ValueError, match="kv_refresh=0.5 .*The adapter 'shakespeare' was trained with .*'kv_source': "
                                         "'memory_layer'.*a keyword overrides them"):
        MemLong.from_pretrained("default", adapter="shakespeare", kv_refresh=0.5)
