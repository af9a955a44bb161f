"""Reader adapters (memlong.reader): active only where retrieved memory is read, exact when off, saved and loaded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from memlong import MemLong
from memlong.reader import READER_EXCLUDED, ReaderConfig, attach_reader, reader_corpus, train_reader

TEXT = ("The lighthouse keeper of Orlen is Mabel Crisp. She rows to the mainland every Tuesday for flour. "
        "Her brother Teodor mends the nets and sings on the pier. ") * 6


def _tiny(tmp_path, steps: int = 3) -> ReaderConfig:
    return ReaderConfig(output_dir=str(tmp_path / "reader"), steps=steps, rank=4, alpha=8.0, lr=5e-2, chars=1500,
                        facts_per_play=2, plays=("julius_caesar", "henry_v"), top_k=(1, 2), save_every=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base model with a (tiny, barely trained) reader attached, its folder, and a bank to read."""
    ml = MemLong.from_pretrained("default", memory_capacity=8192)
    folder = train_reader(ml, _tiny(tmp_path_factory.mktemp("r")), progress=False)
    ml.ingest([TEXT, TEXT.replace("Mabel", "Irma")], namespace="docs", context="chunk", progress=False)
    return ml, folder


def _logits(ml, ids, chunk_ids=None, namespace="docs"):
    memory = ml.memory_for(chunk_ids, namespace) if chunk_ids else None
    with torch.no_grad():
        return ml.run(ids, memory=memory).logits


def test_reader_reads_memory_only_and_is_exact_when_off(trained):
    ml, _ = trained
    ids = ml.encode_prompt("\nQuestion: Who keeps the lighthouse of Orlen?\nAnswer:")
    hits = ml.bank.chunk_ids("docs")[:3]
    with_reader = _logits(ml, ids, hits)
    base_cfg = ml.config
    ml.config = dataclasses.replace(base_cfg, memory_reader=False)
    try:
        off = _logits(ml, ids, hits)
        no_memory_off = _logits(ml, ids)
    finally:
        ml.config = base_cfg
    no_memory_on = _logits(ml, ids)
    assert not torch.allclose(with_reader, off, atol=1e-4), "the trained reader changed nothing"
    assert torch.equal(no_memory_on, no_memory_off), "the reader must not act without memory"
    # off = the base model without any reader, bit for bit, on the same bank
    base = MemLong.from_pretrained("default")
    base.bank = ml.bank
    assert torch.equal(_logits(base, ids, hits), off)
    assert torch.equal(_logits(base, ids), no_memory_on)
    # re-encoding retrieved tokens (kv_reencode_head / kv_refresh) stores-like work: base weights, reader or not
    memory = ml.memory_for(hits, "docs")
    with torch.no_grad():
        (keys, values), n = ml.refresh(memory, hits, "docs", share=0.0, head=8)
        (keys_base, values_base), n_base = base.refresh(memory, hits, "docs", share=0.0, head=8)
    assert n == n_base == 24 and torch.equal(keys, keys_base) and torch.equal(values, values_base)


def test_stored_kv_do_not_depend_on_the_reader(trained, tmp_path):
    ml, _ = trained
    ml.ingest(TEXT, namespace="again", context="document", progress=False)
    keys, _ = ml.bank.fetch(ml.bank.chunk_ids("again"), namespace="again")
    base = MemLong.from_pretrained("default", memory_capacity=8192)
    base.ingest(TEXT, namespace="again", context="document", progress=False)
    keys_base, _ = base.bank.fetch(base.bank.chunk_ids("again"), namespace="again")
    assert torch.equal(keys, keys_base)


def test_saved_reader_loads_and_reads_the_same(trained):
    ml, folder = trained
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["method"] == "reader" and meta["training"]["steps"] == 3
    assert len(json.loads((folder / "losses.json").read_text())) == 3
    loaded = MemLong.from_pretrained("default", adapter=folder, memory_capacity=8192)
    assert loaded.reader is not None and ml.reader is not None
    loaded.bank = ml.bank
    ids = ml.encode_prompt("\nQ: Who mends the nets?\nA:")
    hits = ml.bank.chunk_ids("docs")[-2:]
    assert torch.allclose(_logits(loaded, ids, hits), _logits(ml, ids, hits), atol=1e-5)
    question = "Who keeps the lighthouse of Orlen?"
    answer = loaded.generate(question, namespace="docs", max_new_tokens=4)
    assert loaded.last_generation.memory_tokens > 0
    assert answer == ml.generate(question, namespace="docs", max_new_tokens=4)


def test_bad_reader_input(trained, tmp_path, monkeypatch):
    ml, folder = trained
    with pytest.raises(ValueError, match="already has a reader"):
        attach_reader(ml, folder)
    # matrix review: a reader loaded under settings it cannot read with (it changed the logits, silently); refused
    # before the weights load
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    for wrong in ({"kv_source": "memory_layer"}, {"position_layout": "zero"}):
        with pytest.raises(ValueError, match="A reader reads chunk-context memory per layer in the continual layout"):
            MemLong.from_pretrained("default", adapter=str(folder), **wrong)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="read by the benchmarks"):
        ReaderConfig(output_dir=str(tmp_path), plays=("hamlet",)).validate()
    with pytest.raises(ValueError, match="copy_share"):
        ReaderConfig(output_dir=str(tmp_path), copy_share=1.5).validate()
    with pytest.raises(ValueError, match="not a reader"):
        attach_reader(MemLong.from_pretrained("default"), "shakespeare")
    assert set(READER_EXCLUDED) >= {"hamlet", "macbeth", "tempest"}
    with pytest.raises(ValueError, match="more than the bank's capacity"):  # the default 32,768 < 62k tokens
        train_reader(MemLong.from_pretrained("default", local_window=2048), ReaderConfig(output_dir=str(tmp_path)),
                     progress=False)
    small = MemLong.from_pretrained("default", local_window=512)
    with pytest.raises(ValueError, match="local_window must be at least 1152"):
        train_reader(small, ReaderConfig(output_dir=str(tmp_path / "r"), top_k=(8,)), progress=False)


def test_reader_corpus_plants_every_fact():
    cfg = ReaderConfig(output_dir="unused", chars=3000, facts_per_play=3, plays=("julius_caesar", "henry_v"))
    docs, facts = reader_corpus(cfg)
    assert len(docs) == 2 and len(facts) == 6
    for sentence, question, _prefix, answer in facts:
        assert any(sentence in d for d in docs) and answer in sentence and question.endswith("?")



def test_the_reader_is_trained_on_memory_read_as_configured(trained):
    """distill_loss reads the retrieved K-V through kv_refresh / kv_reencode_head when they are set, as the reader
    will at answer time: with every retrieved token re-encoded and the reader off, the student is (nearly) the
    teacher, and re-encoding the chunk heads moves it part of the way."""
    from memlong.reader import distill_loss

    ml, _ = trained
    hits = ml.bank.chunk_ids("docs")[:3]
    base = ml.config
    loss = {}
    try:
        for name, fields in {"stored": {}, "refresh=1": {"kv_refresh": 1.0}, "head=16": {"kv_reencode_head": 16}}.items():
            ml.config = dataclasses.replace(base, memory_reader=False, **fields)
            with torch.no_grad():
                loss[name] = float(distill_loss(ml, hits, "\nQuestion: Who keeps the lighthouse?\nAnswer:",
                                                " Mabel Crisp.", "docs"))
    finally:
        ml.config = base
    # what is left at refresh=1 comes from the pasted text tokenizing differently where chunks join
    assert loss["refresh=1"] < 0.05 * loss["stored"]
    assert loss["refresh=1"] < loss["head=16"] < loss["stored"]


def test_perplexity_says_it_does_not_use_the_reader(trained):
    """Review finding: `memlong eval ppl --adapter <reader>` scored the base weights without a word (streaming always
    reads memory beside a local cache, where the reader is off)."""
    ml, _ = trained
    with pytest.warns(UserWarning, match="reader adapter is not used by perplexity"):
        with_reader = ml.perplexity(TEXT, score_last=64)["ppl"]
    ml.config.memory_reader = False
    try:
        assert ml.perplexity(TEXT, score_last=64)["ppl"] == with_reader  # the same: what the warning says
    finally:
        ml.config.memory_reader = True
