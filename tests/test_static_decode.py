"""decode_mode (memlong.static_kv): static buffers and the compiled step give the dynamic path's logits."""

import dataclasses

import pytest
import torch

from memlong import generation, static_kv

TEXT = " ".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(60))


def step_logits(ml, monkeypatch, mode, ids, memory, n=12):
    """Every step's next-token scores and the text of a greedy decode in ``mode``."""
    seen = []
    real = generation._next_token

    def spy(scores, temperature, generator):
        seen.append(scores.clone())
        return real(scores, temperature, generator)

    monkeypatch.setattr(generation, "_next_token", spy)
    base = ml.config
    ml.config = dataclasses.replace(base, decode_mode=mode)
    try:
        text = ml.decode(ids, memory, max_new_tokens=n).text()
    finally:
        ml.config = base
        monkeypatch.setattr(generation, "_next_token", real)
    return torch.stack(seen), text


CASES = {
    "per_layer": {},
    "memory_layer, upper layers": {"kv_source": "memory_layer", "retrieval_layers": "upper"},
    "no sink": {"attention_sink": False},
    "zero layout": {"position_layout": "zero", "kv_source": "memory_layer"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_static_decode_gives_the_dynamic_logits(make_tiny, monkeypatch, case):
    ml, _ = make_tiny(local_window=512, **CASES[case])
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    prompt = ml.encode_prompt("Where does the red ship sail?")
    for memory in (ml.memory_for(ids[:3], "doc"), None):
        dynamic, text = step_logits(ml, monkeypatch, "dynamic", prompt, memory)
        static, static_text = step_logits(ml, monkeypatch, "static", prompt, memory)
        assert static.shape == dynamic.shape == (12, ml.model.config.vocab_size)
        torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
        assert static_text == text


def test_ape_reading_stays_dynamic(make_tiny, monkeypatch):
    ml, _ = make_tiny(local_window=512, memory_temperature=0.8)
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    ctx, _ = ml.context(ml.memory_for(ids[:2], "doc"), grow=True)
    assert ctx.ape is not None and static_kv.start_static(ml, ctx, 8) is None and ctx.grow
    prompt = ml.encode_prompt("Which ship?")
    memory = ml.memory_for(ids[:2], "doc")
    torch.testing.assert_close(step_logits(ml, monkeypatch, "static", prompt, memory)[0],
                               step_logits(ml, monkeypatch, "dynamic", prompt, memory)[0])


def test_buffers_hold_exactly_what_was_asked(make_tiny):
    ml, _ = make_tiny(local_window=512, decode_mode="compiled")  # masked buffers: slots and masks both set
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    ctx, _ = ml.context(ml.memory_for(ids[:2], "doc"), grow=True)
    static = static_kv.start_static(ml, ctx, 10)
    starts = {start for start, _ in static.group.values()}
    assert ctx.prefix == {} and not ctx.grow and starts == {257}  # memory + sink in every layer
    assert all(length % static_kv._BUCKET == 0 and length >= 267 for _, length in static.group.values())
    g = static.gid[0]
    static.advance(9)
    static.advance(1)
    assert int(static.slots[g]) == 266 and static.masks[g][0, :267].all()
    assert not static.masks[g][0, 267:].any()
    with pytest.raises(ValueError, match="holds 10 tokens"):
        static.advance(1)
    static.release()


def test_compiled_step_gives_the_dynamic_logits_and_compiles_once_per_shape(make_tiny, monkeypatch):
    from torch._dynamo.utils import counters

    ml, _ = make_tiny(local_window=512)
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    memory = ml.memory_for(ids[:3], "doc")
    torch._dynamo.reset()
    static_kv._POOLS.clear()
    before = counters["stats"]["unique_graphs"]  # counted since the process started
    for prompt in ("Where does the red ship sail?", "Which ship sails to port 7, and when?"):
        ids_ = ml.encode_prompt(prompt)
        dynamic, text = step_logits(ml, monkeypatch, "dynamic", ids_, memory)
        compiled, compiled_text = step_logits(ml, monkeypatch, "compiled", ids_, memory)
        torch.testing.assert_close(compiled, dynamic, atol=1e-4, rtol=1e-4)
        assert compiled_text == text
        if prompt.startswith("Where"):
            frames = counters["stats"]["unique_graphs"]
            assert frames > before
    # the second prompt (other length, same buffer bucket) and its 11 steps reused the first one's compiled step
    assert counters["stats"]["unique_graphs"] == frames
    assert len(static_kv._POOLS[ml]) == 1  # its buffers went back to the pool and were taken again


def test_compiled_step_is_shared_by_memories_of_other_lengths_and_its_buffers_are_bounded(make_tiny, monkeypatch):
    """Service review: the pool (global) and the compiled step's guards took each call's exact prefix length, so every
    other total length of retrieved chunks kept one more set of buffers for good, and compiled the step again."""
    import gc

    from torch._dynamo.utils import counters

    ml, _ = make_tiny(local_window=512)
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    memories = [ml.memory_for(chunks, "doc") for chunks in (ids[:1], ids[-1:], ids[-2:-1])]
    lengths = [m[0].shape[2] for m in memories]
    assert lengths[1] < lengths[0] and max(lengths) + 32 <= static_kv._BUCKET  # the last chunk is short; one bucket
    torch._dynamo.reset()
    static_kv._POOLS.clear()
    prompt = ml.encode_prompt("Which ship sails to port 7?")
    for i, memory in enumerate(memories):
        compiled, text = step_logits(ml, monkeypatch, "compiled", prompt, memory)
        dynamic, dynamic_text = step_logits(ml, monkeypatch, "dynamic", prompt, memory)
        torch.testing.assert_close(compiled, dynamic, atol=1e-4, rtol=1e-4)
        assert text == dynamic_text
        if i == 0:
            frames = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == frames and len(static_kv._POOLS[ml]) == 1
    for n in range(1, 7):  # other answer lengths: other buffer sizes; the pool keeps the newest few
        step_logits(ml, monkeypatch, "compiled", prompt, memories[0], n=n * static_kv._BUCKET)
    assert len(static_kv._POOLS[ml]) == static_kv._POOL_SHAPES
    del ml
    gc.collect()
    assert len(static_kv._POOLS) == 0  # the buffers go with their model


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_interleaved_static_generations_keep_their_own_buffers(make_tiny, mode):
    ml, _ = make_tiny(local_window=512, decode_mode=mode)
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    alone = [ml.generate(q, namespace="doc", chunk_ids=ids[:2], max_new_tokens=6) for q in ("Which ship?", "Port?")]
    a, b = (ml.generate(q, namespace="doc", chunk_ids=ids[:2], max_new_tokens=6, stream=True)
            for q in ("Which ship?", "Port?"))
    pieces = [next(a), next(b)]
    assert [pieces[0] + a.text(), pieces[1] + b.text()] == alone


def test_decode_mode_is_checked(make_tiny):
    with pytest.raises(ValueError, match="decode_mode must be one of static, dynamic, compiled"):
        make_tiny(decode_mode="fast")


def test_compiled_stream_steps_store_what_eager_steps_store_and_compile_twice(make_tiny):
    from torch._dynamo.utils import counters

    ml, _ = make_tiny(local_window=512)
    docs = [TEXT + TEXT, TEXT + TEXT[: len(TEXT) // 2]]
    assert all(len(ml.tokenize(d)) > 2 * ml.config.store_step for d in docs)
    eager = ml.ingest(docs, namespace="eager", progress=False).chunk_ids
    ml.config = dataclasses.replace(ml.config, stream_compile=True)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # counted since the process started
    compiled = ml.ingest(docs, namespace="compiled", progress=False).chunk_ids
    assert len(compiled) == len(eager)
    for a, b in zip(eager, compiled):
        ca, cb = ml.bank.get(a, namespace="eager"), ml.bank.get(b, namespace="compiled")
        assert ca.span == cb.span and ca.text == cb.text
        torch.testing.assert_close(cb.keys, ca.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cb.values, ca.values, atol=1e-4, rtol=1e-4)
    # a document's first step (sink only) and the steady state (sink + full cache); last steps run eagerly
    assert counters["stats"]["unique_graphs"] - before == 2
