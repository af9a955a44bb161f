"""Options for reading several retrieved chunks (issue 15): APE temperature/scale and EPIC boundary re-encode."""

import dataclasses
import math

import pytest
import torch
from helpers import SHIP_TEXT, three_chunks_pasted

from memlong.attention import ape_attention, joint_attention

TEXT = SHIP_TEXT


def naive_ape(q, k, v, n_visible, n_memory, scaling, t, s):
    """APE written as its two parts (float64): softmax(s/T) within memory C, the causal joint softmax within the
    rest O, mixed by softmax([S*T*LSE_C(s/T), LSE_O(s)])."""
    b, h, lq, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, h, lq, d, dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head // groups].double(), v[:, head // groups].double()
        for i in range(lq):
            sc = (q[:, head, i: i + 1].double() @ kh.transpose(-1, -2))[:, 0] * scaling  # (B, Lk)
            c, o = sc[:, :n_memory] / t, sc[:, n_memory: n_visible + i + 1]
            out_c = torch.softmax(c, -1) @ vh[:, :n_memory]
            out_o = torch.softmax(o, -1) @ vh[:, n_memory: n_visible + i + 1]
            w = torch.softmax(torch.stack([s * t * c.logsumexp(-1), o.logsumexp(-1)], -1), -1)  # (B, 2)
            out[:, head, i] = w[:, :1] * out_c + w[:, 1:] * out_o
    return out


def _qkv(lq=5, n_visible=12, seed=0):
    torch.manual_seed(seed)
    return torch.randn(1, 6, lq, 16), torch.randn(1, 2, n_visible + lq, 16), torch.randn(1, 2, n_visible + lq, 16)


def test_ape_with_temperature_and_scale_one_is_the_joint_softmax():
    q, k, v = _qkv()
    out = ape_attention(q, k, v, 12, 9, 0.25, 1.0, 1.0)
    torch.testing.assert_close(out, joint_attention(q, k, v, 12, 0.25, "eager"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t, s", [(0.9, 0.9), (0.5, 1.2), (1.0, 0.7)])
def test_ape_matches_its_two_part_definition(t, s):
    q, k, v = _qkv(seed=int(10 * t + s))
    out = ape_attention(q, k, v, 12, 9, 1 / math.sqrt(16), t, s)
    torch.testing.assert_close(out.double(), naive_ape(q, k, v, 12, 9, 1 / math.sqrt(16), t, s), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, joint_attention(q, k, v, 12, 1 / math.sqrt(16), "eager"), atol=1e-3)


def test_ape_checks_the_memory_length():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="n_memory"):
        ape_attention(q, k, v, 12, 13, 0.25, 0.9, 0.9)


def _answer_logits(ml, prompt, memory, ape=None):
    ctx, pos = ml.context(memory)
    if ape is not None:
        ctx.ape = ape
    with torch.no_grad():
        return ml.run(prompt, positions=torch.arange(len(prompt)) + pos, context=ctx).logits[0]


def test_options_off_give_todays_logits_and_ape_one_equals_plain(make_tiny):
    """Off (T = S = 1, head 0): the joint softmax path, untouched; forcing APE's path with T = S = 1 equals it."""
    ml, _ = make_tiny(memory_temperature=1.0, memory_scale=1.0, kv_reencode_head=0)
    stats = ml.ingest(TEXT, namespace="doc", context="chunk", progress=False)
    picked = [stats.chunk_ids[i] for i in (1, 4, 6)]
    memory = ml.memory_for(picked, "doc")
    prompt = ml.tokenize(" Where does the red ship sail?")
    assert ml.context(memory)[0].ape is None
    plain = _answer_logits(ml, prompt, memory)
    torch.testing.assert_close(_answer_logits(ml, prompt, memory, ape=(1.0, 1.0)), plain, atol=1e-5, rtol=1e-5)
    ml.generate(" Where?", namespace="doc", chunk_ids=picked, max_new_tokens=1)
    assert ml.last_generation.refreshed_tokens == 0


def test_ape_changes_answer_time_reading_only(make_tiny):
    """APE reads memory at answer time; the K-V a stream stores are the same with it on."""
    off, _ = make_tiny()
    on, _ = make_tiny(memory_temperature=0.9, memory_scale=0.9)
    s_off = off.ingest(TEXT, namespace="doc", progress=False, context="document")
    s_on = on.ingest(TEXT, namespace="doc", progress=False, context="document")
    for a, b in zip(s_off.chunk_ids, s_on.chunk_ids, strict=True):
        torch.testing.assert_close(off.bank.get(a, namespace="doc").keys, on.bank.get(b, namespace="doc").keys)
    picked = s_on.chunk_ids[:3]
    prompt = on.tokenize(" Where does the red ship sail?")
    memory = on.memory_for(picked, "doc")
    assert on.context(memory)[0].ape == (0.9, 0.9)
    assert on.context(None)[0].ape is None and on.context(memory, capture=True)[0].ape is None
    expected = _answer_logits(on, prompt, memory, ape=(0.9, 0.9))
    torch.testing.assert_close(_answer_logits(on, prompt, memory), expected)
    assert not torch.allclose(expected, _answer_logits(off, prompt, off.memory_for(s_off.chunk_ids[:3], "doc")),
                              atol=1e-4)


def test_head_re_encode_of_whole_chunks_equals_encoding_the_text(make_tiny):
    """EPIC boundary re-encode with n = chunk length re-encodes everything: exactly the pasted reading."""
    ml, reference = make_tiny()
    picked, _, prompt, expected = three_chunks_pasted(ml, reference)
    with torch.no_grad():
        fresh, n = ml.refresh(ml.memory_for(picked, "doc"), picked, "doc", 0.0, head=128)
    assert n == 3 * 128
    torch.testing.assert_close(_answer_logits(ml, prompt, fresh), expected, atol=1e-4, rtol=1e-4)


def test_head_re_encode_touches_chunk_starts_and_composes_with_the_share(make_tiny):
    ml, _ = make_tiny(kv_reencode_head=8)
    stats = ml.ingest(TEXT, namespace="doc", context="chunk", progress=False)
    picked = [stats.chunk_ids[i] for i in (1, 4, 6)]
    stale = ml.memory_for(picked, "doc")
    with torch.no_grad():
        (keys, _), n = ml.refresh(stale, picked, "doc", 0.0)  # head from the config
        (keys2, _), n2 = ml.refresh(stale, picked, "doc", 0.25, head=8)
    assert n == 3 * 8
    changed = (keys - stale[0]).abs().amax(dim=(0, 1, 3)) > 1e-5
    starts = torch.zeros(3 * 128, dtype=torch.bool)
    for c in range(3):
        starts[c * 128: c * 128 + 8] = True
    starts[:8] = False  # the first chunk's chunk-alone K-V already are the pasted ones
    assert torch.equal(changed, starts)
    assert n2 == 3 * 8 + math.ceil(0.25 * 3 * 128)  # the share is ranked among the other tokens
    changed2 = (keys2 - stale[0]).abs().amax(dim=(0, 1, 3)) > 1e-5
    assert changed2[starts].all() and int(changed2.sum()) > int(changed.sum())
    ml.generate("Where?", namespace="doc", chunk_ids=picked, max_new_tokens=1)
    assert ml.last_generation.refreshed_tokens == 3 * 8


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_temperature": 0.0}, "memory_temperature must be a number > 0"),
    ({"memory_temperature": -1}, "memory_temperature must be a number > 0"),
    ({"memory_scale": 0}, "memory_scale must be a number > 0"),
    ({"memory_scale": True}, "memory_scale must be a number > 0"),
    ({"kv_reencode_head": 33}, "kv_reencode_head must be an integer token count in 0..32"),
    ({"kv_reencode_head": -1}, "kv_reencode_head must be"),
    ({"kv_reencode_head": 8, "kv_source": "memory_layer", "retrieval_layers": "upper"},
     "kv_reencode_head=8 re-encodes retrieved tokens in every layer"),
    ({"kv_reencode_head": 8, "position_layout": "zero"}, "position_layout='continual'"),
    ({"retrieve_next": 5}, "retrieve_next must be an integer chunk count in 0..4"),
    ({"retrieve_next": -1}, "retrieve_next must be"),
    ({"retrieve_next": True}, "retrieve_next must be"),
])
def test_reading_options_are_checked(kwargs, message):
    from memlong import MemLongConfig

    with pytest.raises(ValueError, match=message):
        MemLongConfig(**kwargs).resolve(num_layers=4)


def test_reading_options_are_off_by_default():
    from memlong import MemLongConfig

    cfg = MemLongConfig().resolve(num_layers=4)
    assert (cfg.kv_reencode_head, cfg.memory_temperature, cfg.memory_scale, cfg.kv_refresh) == (0, 1.0, 1.0, 0.0)


def test_demo_command_re_encodes_chunk_starts_where_the_model_can():
    """`memlong demo` defaults to kv_reencode_head=32 (the full-Hamlet demo answers with it); dropped where the
    settings cannot re-encode (memory_layer, zero layout, a trained adapter) instead of failing."""
    from memlong.cli import _config, build_parser

    parser = build_parser()
    assert _config(parser.parse_args(["demo"]))["kv_reencode_head"] == 32
    assert "kv_reencode_head" not in _config(parser.parse_args(["demo", "--kv-source", "memory_layer"]))
    assert "kv_reencode_head" not in _config(parser.parse_args(["demo", "--position-layout", "zero"]))
    assert "kv_reencode_head" not in _config(parser.parse_args(["demo", "--adapter", "some/folder"]))
    assert "kv_reencode_head" not in _config(parser.parse_args(["eval", "passkey"]))


def test_retrieve_next_reads_the_chunks_that_continue_each_hit(make_tiny):
    """A sentence cut by a chunk boundary: search finds its first half, retrieve_next=1 adds the second half (the
    chunk whose span starts where the hit ends, same document); explicit chunk_ids are never expanded."""
    from memlong.memory import UnknownChunkError

    ml, _ = make_tiny(local_window=512, top_k=2)
    a = ml.ingest(SHIP_TEXT, namespace="doc", progress=False, doc_ids=["a"]).chunk_ids
    b = ml.ingest(SHIP_TEXT, namespace="doc", progress=False, doc_ids=["b"]).chunk_ids
    assert len(a) >= 3
    bank = ml.bank
    assert bank.following([a[0]], namespace="doc", n=1) == a[:2]
    assert bank.following([a[0], a[1]], namespace="doc", n=2) == a[:4]  # a[1], a[2] once
    assert bank.following([a[-1]], namespace="doc", n=3) == [a[-1]]  # a document's last chunk: nothing follows
    assert bank.following([b[0]], namespace="doc", n=1) == b[:2]  # never crosses into another document
    assert bank.following([a[1]], namespace="doc", n=0) == [a[1]]
    with pytest.raises(UnknownChunkError):
        bank.following(["nope"], namespace="doc")
    # one doc_id ingested several times (a LlamaIndex document's nodes; each ingest's spans start at 0)
    one = ml.ingest(SHIP_TEXT[:40], namespace="nodes", progress=False, doc_ids=["ref"]).chunk_ids
    first = ml.ingest(SHIP_TEXT, namespace="nodes", progress=False, doc_ids=["ref"]).chunk_ids
    second = ml.ingest(SHIP_TEXT, namespace="nodes", progress=False, doc_ids=["ref"]).chunk_ids
    assert len(one) == 1 and bank.following(one, namespace="nodes", n=2) == one
    assert bank.following([first[0]], namespace="nodes", n=2) == first[:3]
    assert bank.following([second[0]], namespace="nodes", n=2) == second[:3]
    assert bank.following([first[-1]], namespace="nodes", n=2) == [first[-1]]
    hits = [h.chunk_id for h in bank.search("Where does the red ship sail?", namespace="doc", k=2, count=False)]
    ml.config = dataclasses.replace(ml.config, retrieve_next=1)
    ml.generate("Where does the red ship sail?", namespace="doc", max_new_tokens=1)
    assert ml.last_generation.chunk_ids == bank.following(hits, namespace="doc", n=1)
    assert len(ml.last_generation.chunk_ids) > len(hits)
    ml.generate("Where?", namespace="doc", chunk_ids=a[:1], max_new_tokens=1)
    assert ml.last_generation.chunk_ids == a[:1]
