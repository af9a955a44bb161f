import numpy as np
import pytest
import torch

from memlong import MemLong, MemLongConfig, PromptTooLongError, UnknownChunkError
from memlong.attention import AttentionContext

TEXT = " ".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(120))


def ids_with_sink(ml, ids):
    return torch.cat([torch.tensor([ml.sink_ids]), ids], 1)


def test_empty_memory_equals_stock_model(make_tiny):
    ml, reference = make_tiny()
    ids = torch.randint(3, 5000, (1, 300))
    with torch.no_grad():
        expected = reference(ids_with_sink(ml, ids)).logits[0, 1:]
        got = ml.forward(ids, namespace="empty")["logits"][0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_continual_memory_equals_full_attention(make_tiny, backend):
    """per_layer + continual, memory = exactly the preceding chunks (K-V from one full pass) == full pass."""
    ml, reference = make_tiny(retrieval_layers="all", attention_backend=backend)
    ids = torch.randint(3, 5000, (1, 256 + 60))
    full = ids_with_sink(ml, ids)
    ctx = AttentionContext(capture=True, backend="eager")
    with torch.no_grad():
        expected = reference(full).logits[0, 1:]
        ml.run(full[0].tolist(), positions=torch.arange(full.shape[1]), context=ctx, logits_for=None)
    spans = [(0, 128), (128, 256)]
    keys = [torch.stack([ctx.captured[layer][0][0, :, 1 + s : 1 + e] for layer in range(4)]) for s, e in spans]
    values = [torch.stack([ctx.captured[layer][1][0, :, 1 + s : 1 + e] for layer in range(4)]) for s, e in spans]
    texts = [ml.tokenizer.decode(ids[0, s:e]) for s, e in spans]
    chunk_ids = ml.bank.add_chunks(texts, keys=keys, values=values, namespace="doc")
    with torch.no_grad():
        got = ml.forward(ids[:, 256:], namespace="doc", chunk_ids=chunk_ids[::-1])["logits"][0]  # order restored
    torch.testing.assert_close(got, expected[256:], atol=1e-4, rtol=1e-4)
    assert (got - expected[256:]).abs().max() < 1e-4


def test_zero_layout_and_memory_layer_mode_change_only_retrieval_layers(make_tiny):
    ml, _ = make_tiny(kv_source="memory_layer", memory_layer=2, retrieval_layers=(2, 3), position_layout="zero")
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    chunk = ml.bank.get(stats.chunk_ids[0], namespace="doc")
    assert chunk.keys.shape[0] == 1  # only the memory layer's K-V is stored
    ctx, start = ml.context(ml.memory_for(stats.chunk_ids[:2], "doc"))
    assert start == 1  # zero layout: local tokens start at 1 whatever the memory size
    assert ctx.prefix[3][0].shape[2] == 256 + 1 and ctx.prefix[1][0].shape[2] == 1  # memory only in layers 2, 3


def test_ingest_streams_with_bounded_cache_and_previous_chunk_queries(make_tiny):
    ml, _ = make_tiny(local_window=512, ingest_step=256, top_k=2, ingest_top_k=2)
    queries = []
    search = ml.bank.search

    def spy(query, **kwargs):
        queries.append(query)
        return search(query, **kwargs)

    ml.bank.search = spy
    tokens = ml.tokenize(TEXT)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    assert stats.tokens == len(tokens) and stats.chunks == len(ml.bank.chunk_ids("doc")) == -(-len(tokens) // 128)
    # every step after the first retrieved with the previous chunk, never with its own tokens; that chunk was
    # just embedded for the bank, so its embedding is the query (not a second encoding of the same text)
    steps = [tokens[s : s + 256] for s in range(0, len(tokens), 256)]
    assert len(queries) == len(steps) - 1
    for i, query in enumerate(queries, start=1):
        expected = ml.bank.embedder.encode([ml.tokenizer.decode(steps[i - 1][-128:])])
        assert isinstance(query, np.ndarray) and query.shape == expected.shape
        np.testing.assert_allclose(query / np.linalg.norm(query), expected / np.linalg.norm(expected), atol=1e-4)
    # spans cover the document in order
    spans = [ml.bank.get(c, namespace="doc").span for c in stats.chunk_ids]
    assert spans[0] == (0, 128) and spans[-1][1] == len(tokens)


def test_default_ingest_steps_a_window_less_one_chunk(make_tiny):
    """Nothing retrieved while storing and no ingest_step: ``ingest`` steps the window less one chunk, keeping one
    chunk of cache (the K-V of a stream of such steps, bit for bit; half-window steps store other K-V past the
    first step); a document within one step stores the same K-V either way; scoring keeps half windows."""
    from memlong.streaming import Stream

    ml, _ = make_tiny(local_window=512)
    assert (ml.config.store_step, ml.config.step, ml.config.chunk_size) == (384, 256, 128)
    tokens = ml.tokenize(TEXT)
    assert len(tokens) > 3 * 384
    ids = ml.ingest(TEXT, namespace="default-steps", progress=False).chunk_ids

    def streamed(namespace, step_size, toks):
        stream = Stream(ml, namespace, doc_id="d", step_size=step_size)
        with torch.no_grad():
            for s in range(0, len(toks), step_size):
                stream.step(toks[s:s + step_size])
                assert stream.cache_len == min(512 - step_size, stream.offset)  # the cache keeps window - step
        stream.flush()
        return stream.chunk_ids

    steps, half = streamed("steps", 384, tokens), streamed("half", 256, tokens)
    stored = {ns: ml.memory_for(c, ns)[0] for ns, c in [("default-steps", ids), ("steps", steps), ("half", half)]}
    assert torch.equal(stored["default-steps"], stored["steps"])
    first, rest = slice(None, 384), slice(384, None)  # keys (L_src, Hkv, tokens, D)
    torch.testing.assert_close(stored["half"][:, :, first], stored["steps"][:, :, first], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(stored["half"][:, :, rest], stored["steps"][:, :, rest], atol=1e-3)
    short = tokens[:300]  # within one step: every token sees all the tokens before it either way
    a, b = streamed("short-steps", 384, short), streamed("short-half", 256, short)
    torch.testing.assert_close(ml.memory_for(a, "short-steps")[1], ml.memory_for(b, "short-half")[1],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="step_size"):
        Stream(ml, "x", step_size=513)
    stream = Stream(ml, "x", step_size=256)
    with pytest.raises(ValueError, match="longer than this stream's step_size"):  # it read 257 tokens of context
        stream.step(tokens[:257])
    assert stream.offset == 0 and not ml.bank.chunk_ids("x")


def test_ingest_does_not_retrieve_by_default(make_tiny):
    ml, _ = make_tiny(local_window=512, ingest_step=256, top_k=2)
    assert ml.config.ingest_top_k == 0
    calls = []
    search = ml.bank.search
    ml.bank.search = lambda query, **kw: calls.append(query) or search(query, **kw)
    ml.ingest(TEXT, namespace="doc", progress=False)
    assert calls == []
    ml.generate("Where does the red ship sail?", namespace="doc", max_new_tokens=1)
    assert len(calls) == 1 and len(ml.last_generation.chunk_ids) == 2  # reading still retrieves top_k


def test_batched_ingest_writes_store_what_per_step_writes_store(make_tiny, monkeypatch):
    """With nothing retrieved while storing, chunks are embedded in batches: same bank content, same writes."""
    import memlong.streaming

    text = TEXT * 3  # ~5.7k tokens: more than one batch, and a partial batch at the end
    ml, _ = make_tiny(local_window=512, ingest_step=256)
    writes, encodes = [], []
    add, encode = ml.bank.add_chunks, ml.bank.embedder.encode
    ml.bank.add_chunks = lambda texts, **kw: writes.append(len(texts)) or add(texts, **kw)
    monkeypatch.setattr(ml.bank.embedder, "encode", lambda texts: encodes.append(len(texts)) or encode(texts))
    batched = ml.ingest([text, TEXT], namespace="a", doc_ids=["d1", "d2"], progress=False)
    monkeypatch.setattr(memlong.streaming, "_WRITE_BATCH_TOKENS", 0)  # embed every step at once
    n_batched, n_encodes = len(writes), len(encodes)
    per_step = ml.ingest([text, TEXT], namespace="b", doc_ids=["d1", "d2"], progress=False)
    assert n_batched == len(writes) - n_batched  # the bank is still written step by step
    assert n_encodes < len(encodes) - n_encodes  # but embedded in fewer, bigger batches
    assert len(batched.chunk_ids) == len(per_step.chunk_ids) > 40
    for a, b in zip(batched.chunk_ids, per_step.chunk_ids):
        ca, cb = ml.bank.get(a, namespace="a"), ml.bank.get(b, namespace="b")
        assert (ca.text, ca.doc_id, ca.span) == (cb.text, cb.doc_id, cb.span)
        assert torch.equal(ca.keys, cb.keys) and torch.equal(ca.values, cb.values)
    assert [h.chunk_id for h in ml.bank.search("the blue ship", namespace="a", k=5)] == \
        [batched.chunk_ids[per_step.chunk_ids.index(h.chunk_id)] for h in ml.bank.search("the blue ship",
                                                                                           namespace="b", k=5)]


@pytest.mark.parametrize("ingest_top_k", [0, 3])
def test_chunk_context_stores_what_the_chunk_alone_computes(make_tiny, ingest_top_k):
    """context="chunk": a chunk's K-V are those of [sink + the chunk] run on their own (what pasting it at the
    start of a prompt computes), also with ``ingest_top_k`` set (matrix review: each chunk attended to the chunks it
    retrieved, 0.35-0.58 off); context="document" K-V of later chunks carry their document window."""
    ml, _ = make_tiny(local_window=512, ingest_top_k=ingest_top_k)
    alone = ml.ingest(TEXT, namespace="c", context="chunk", progress=False)
    streamed = ml.ingest(TEXT, namespace="d", progress=False)
    for cid in (alone.chunk_ids[0], alone.chunk_ids[5]):
        chunk = ml.bank.get(cid, namespace="c")
        tokens = ml.tokenize(TEXT)[chunk.span[0]:chunk.span[1]]
        ctx = AttentionContext(capture=True, backend="eager")
        with torch.no_grad():
            ml.run(ml.sink_ids + tokens, positions=torch.arange(len(tokens) + 1), context=ctx, logits_for=None)
        expected = torch.stack([ctx.captured[layer][0][0, :, 1:] for layer in ml.config.source_layers])
        torch.testing.assert_close(chunk.keys, expected, atol=1e-4, rtol=1e-4)
    later = ml.bank.get(streamed.chunk_ids[5], namespace="d")
    assert later.span == ml.bank.get(alone.chunk_ids[5], namespace="c").span
    assert not torch.allclose(later.keys, ml.bank.get(alone.chunk_ids[5], namespace="c").keys, atol=1e-3)
    with pytest.raises(ValueError, match="context must be 'document'"):
        ml.ingest(TEXT, namespace="x", context="page", progress=False)
    assert "x" not in ml.bank.namespaces()


def test_generate_uses_explicit_chunks_and_streams(make_tiny):
    ml, _ = make_tiny(top_k=2)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    pieces = list(ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:3],
                              max_new_tokens=5, stream=True))
    assert ml.last_generation.memory_tokens == 3 * 128
    assert ml.last_generation.prompt_tokens == len(ml.tokenize("Where does the red ship sail?"))
    assert ml.last_generation.chunk_ids == stats.chunk_ids[:3]
    text = ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:3],
                       max_new_tokens=5)
    assert text == "".join(pieces)  # greedy: streaming and blocking agree
    ml.generate("Where does the red ship sail?", namespace="doc", max_new_tokens=2)
    assert len(ml.last_generation.chunk_ids) == 2  # automatic retrieval with the prompt as query


def test_a_stream_that_cannot_fit_the_models_positions_fails_when_called(make_tiny):
    """Comments-vs-code audit (session 24): Generation promises that everything that can fail on the input has
    failed before it exists, but the position check ran at the first next(): a streaming server had already sent
    its headers. generate(stream=True) now raises itself, as decode() does."""
    ml, _ = make_tiny(top_k=2)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    for stream in (True, False):
        with pytest.raises(ValueError, match=r"need \d+ positions; the model has \d+"):
            ml.generate("Hello there", max_new_tokens=ml.max_positions, stream=stream, retrieve=False)
        with pytest.raises(ValueError, match="Lower max_new_tokens or top_k"):
            ml.generate("Hello there", namespace="doc", chunk_ids=stats.chunk_ids[:2], stream=stream,
                        max_new_tokens=ml.max_positions - 2 * 128)
    with pytest.raises(ValueError, match="positions"):
        ml.decode(ml.tokenize("Hello there")[1:], max_new_tokens=ml.max_positions)
    assert ml.generate("Hello there", namespace="doc", chunk_ids=stats.chunk_ids[:2], max_new_tokens=3) is not None


def test_bad_input_is_refused_without_losing_memory(make_tiny):
    ml, _ = make_tiny(local_window=256, ingest_step=128)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    before = ml.bank.chunk_ids("doc")
    with pytest.raises(ValueError, match="empty"):
        ml.ingest("   ", namespace="doc")
    with pytest.raises(ValueError, match="empty"):
        ml.generate("", namespace="doc")
    with pytest.raises(UnknownChunkError, match="not in namespace 'other'"):
        ml.generate("Where?", namespace="other", chunk_ids=stats.chunk_ids[:1])
    with pytest.raises(UnknownChunkError):
        ml.generate("Where?", namespace="doc", chunk_ids=["0" * 24])
    with pytest.raises(ValueError, match="longer than the local window") as caught:
        ml.generate(TEXT, namespace="doc")
    assert isinstance(caught.value, PromptTooLongError)  # typed, with the numbers, so callers can shorten it
    assert caught.value.tokens == len(ml.strip_sink(ml.tokenize(TEXT))) > caught.value.window == ml.config.local_window
    assert ml.bank.chunk_ids("doc") == before


def test_unsupported_architecture(tokenizer, embedder):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="Unsupported model architecture 'gpt2'"):
        MemLong(model, tokenizer, MemLongConfig(), embedder=embedder)


def test_training_forward_has_gradients_only_where_asked(make_tiny):
    ml, _ = make_tiny(top_k=2)
    ml.ingest(TEXT, namespace="doc", progress=False)
    for layer in ml.decoder.layers[:2]:
        layer.requires_grad_(False)
    ml.model.train()
    ids = torch.tensor([ml.tokenize(TEXT)[:64]])
    out = ml.forward(ids, labels=ids, namespace="doc")
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert ml.decoder.layers[3].self_attn.q_proj.weight.grad is not None
    assert ml.decoder.layers[0].self_attn.q_proj.weight.grad is None


def test_ingest_copies_document_metadata_onto_chunks(make_tiny):
    ml, _ = make_tiny()
    stats = ml.ingest(["alpha beta gamma " * 40, "delta epsilon " * 40], namespace="m", doc_ids=["a", "b"],
                      metadatas=[{"source": "one"}, {"source": "two"}], progress=False)
    sources = {ml.bank.get(c, namespace="m").doc_id: ml.bank.get(c, namespace="m").metadata["source"]
               for c in stats.chunk_ids}
    assert sources == {"a": "one", "b": "two"}
    with pytest.raises(ValueError, match="metadatas"):
        ml.ingest(["x y z"], namespace="m", metadatas=[{}, {}], progress=False)
    ml.run = None  # unstorable metadata is refused before any forward (it was refused by the bank after them all)
    with pytest.raises(ValueError, match="namespace"):
        ml.ingest(["x y z"], namespace="", progress=False)
    for bad in ({"when": object()}, {"x": float("nan")}, {1: "int key"}):
        with pytest.raises(ValueError, match=r"metadatas\[1\] JSON cannot store"):
            ml.ingest(["x y z", "u v w"], namespace="m", metadatas=[{}, bad], progress=False)


def test_a_failed_ingest_leaves_none_of_its_chunks(make_tiny, monkeypatch):
    """An ingest that raises midway (an eviction warning turned into an error, any failure, an interrupt) leaves
    no half document behind and the earlier documents as they were; a successful one lists only chunks still
    stored (a document over capacity evicts its own first chunks)."""
    import warnings

    from memlong import MemoryEvictionWarning

    ml, _ = make_tiny(chunk_size=16, local_window=64, memory_capacity=512)
    first = ml.ingest("alpha beta gamma " * 30, namespace="m", doc_ids=["kept"], progress=False)
    before = ml.bank.chunk_ids("m")
    assert before == first.chunk_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryEvictionWarning)
        with pytest.raises(MemoryEvictionWarning):
            ml.ingest(["delta epsilon " * 20, "zeta eta theta " * 150], namespace="m", progress=False)
    assert ml.bank.chunk_ids("m") == before
    calls = []
    real = ml.bank.add_chunks

    def failing(*args, **kwargs):  # the second write of the call fails
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ml.bank, "add_chunks", failing)
    with pytest.raises(KeyboardInterrupt):
        ml.ingest(["delta epsilon " * 20, "iota kappa " * 60], namespace="m", progress=False)
    monkeypatch.undo()
    assert len(calls) == 2 and ml.bank.chunk_ids("m") == before
    with pytest.warns(MemoryEvictionWarning):
        stats = ml.ingest("zeta eta theta " * 250, namespace="m", progress=False)
    stored = ml.bank.chunk_ids("m")
    assert stats.chunk_ids and set(stats.chunk_ids) <= set(stored) and stats.chunks == len(stats.chunk_ids)
    assert stats.evicted > 0
    assert all(ml.bank.get(c, namespace="m").doc_id != "kept" for c in stored[-len(stats.chunk_ids):])


def _answer_logits(ml, prompt_ids, memory):
    with torch.no_grad():
        return ml.run(prompt_ids, memory=memory).logits[0]


def test_kv_refresh_all_equals_encoding_the_retrieved_text(make_tiny):
    """kv_refresh=1: retrieved chunk-alone K-V re-encoded after the chunks before them == one pass over the text."""
    ml, reference = make_tiny(kv_refresh=1.0)
    stats = ml.ingest(TEXT, namespace="doc", context="chunk", progress=False)
    picked = [stats.chunk_ids[i] for i in (5, 0, 3)]  # not adjacent; order restored by the bank
    tokens = [t for i in (0, 3, 5) for t in ml.bank.get(stats.chunk_ids[i], namespace="doc").tokens]
    assert tokens[:128] == ml.tokenize(TEXT)[:128]  # the ids the K-V were computed from are recorded
    prompt = ml.tokenize(" Where does the red ship sail?")
    with torch.no_grad():
        expected = reference(torch.tensor([ml.sink_ids + tokens + prompt])).logits[0, -len(prompt):]
        stale = ml.memory_for(picked, "doc")
        fresh, n = ml.refresh(stale, picked, "doc", 1.0)
    assert n == len(tokens) == 3 * 128
    torch.testing.assert_close(_answer_logits(ml, prompt, fresh), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_answer_logits(ml, prompt, stale), expected, atol=1e-3)  # chunks never saw each other
    before = ml.bank.get(picked[0], namespace="doc").keys.clone()
    ml.generate(" Where does the red ship sail?", namespace="doc", chunk_ids=picked, max_new_tokens=2)
    assert ml.last_generation.refreshed_tokens == 3 * 128 and ml.last_generation.prompt_tokens == len(prompt)
    assert torch.equal(ml.bank.get(picked[0], namespace="doc").keys, before)  # the bank is left as stored


def test_kv_refresh_share_re_encodes_only_what_the_probe_ranks_first(make_tiny):
    ml, _ = make_tiny(kv_refresh=0.25)
    stats = ml.ingest(TEXT, namespace="doc", context="chunk", progress=False)
    picked = [stats.chunk_ids[i] for i in (1, 4)]
    stale = ml.memory_for(picked, "doc")
    with torch.no_grad():
        (keys, _), n = ml.refresh(stale, picked, "doc", 0.25)
    assert n == 64  # a quarter of 256 retrieved tokens
    changed = (keys - stale[0]).abs().amax(dim=(0, 1, 3)) > 0
    assert int(changed.sum()) == 64
    # the first chunk's chunk-alone K-V already are what the text would give: the probe never picks them
    assert not changed[:128].any()
    ml.generate("Where?", namespace="doc", chunk_ids=picked, max_new_tokens=1)
    assert ml.last_generation.refreshed_tokens == 64
    ml.generate("Where?", namespace="doc", chunk_ids=[], max_new_tokens=1)
    assert ml.last_generation.refreshed_tokens == 0
    # bad amounts and a memory of other chunks are named (they failed inside, or passed silently)
    for bad, match in (({"share": -1.0}, "share must be"), ({"share": 2.0}, "share must be"),
                       ({"share": 0.5, "head": -1}, "head must be"), ({"share": 0.5, "head": 2.5}, "head must be")):
        with pytest.raises(ValueError, match=match):
            ml.refresh(stale, picked, "doc", **bad)
    with pytest.raises(ValueError, match="memory holds 256 tokens but chunk_ids 128"):
        ml.refresh(stale, picked[:1], "doc", 0.5)


def test_kv_refresh_config_is_checked(make_tiny):
    with pytest.raises(ValueError, match="kv_refresh must be a share"):
        make_tiny(kv_refresh=1.5)
    with pytest.raises(ValueError, match="kv_source='per_layer', retrieval_layers='all'"):
        make_tiny(kv_refresh=0.5, kv_source="memory_layer", retrieval_layers="upper")
    with pytest.raises(ValueError, match="retrieval_layers='all'"):
        make_tiny(kv_refresh=0.5, retrieval_layers=(2, 3))
    with pytest.raises(ValueError, match="position_layout='continual'"):
        make_tiny(kv_refresh=0.5, position_layout="zero")


def test_chunk_context_strip_stores_the_stripped_text_and_its_kv(make_tiny):
    """strip=True: chunk text without surrounding whitespace, K-V of exactly those tokens, spans in the document."""
    ml, _ = make_tiny()
    plain = ml.ingest(TEXT, namespace="p", context="chunk", progress=False)
    stripped = ml.ingest(TEXT, namespace="s", context="chunk", strip=True, progress=False)
    assert len(plain.chunk_ids) == len(stripped.chunk_ids)
    changed = 0
    for a, b in zip(plain.chunk_ids, stripped.chunk_ids):
        x, y = ml.bank.get(a, namespace="p"), ml.bank.get(b, namespace="s")
        assert y.span == x.span and y.text == x.text.strip()
        assert list(y.tokens) == ml.tokenize(y.text) and y.n_tokens == len(y.tokens)
        ctx = AttentionContext(capture=True, backend="eager")
        with torch.no_grad():
            ml.run(ml.sink_ids + list(y.tokens), positions=torch.arange(y.n_tokens + 1), context=ctx, logits_for=None)
        expected = torch.stack([ctx.captured[layer][0][0, :, 1:] for layer in ml.config.source_layers])
        torch.testing.assert_close(y.keys, expected, atol=1e-4, rtol=1e-4)
        changed += x.text != y.text
    assert changed > 0  # chunks of TEXT start with a space: stripping changed them
    with pytest.raises(ValueError, match="strip=True .* needs context='chunk'"):
        ml.ingest(TEXT, namespace="x", strip=True, progress=False)


@pytest.mark.parametrize("kv_source", ["per_layer", "memory_layer"])
def test_layers_rotated_together_give_the_bits_of_one_layer_at_a_time(make_tiny, monkeypatch, kv_source):
    """build_context rotates [sink | cache] of every layer in one call and retrieved memory in blocks of layers
    (``_ROTATE_BYTES``): the prefix is bit for bit the one built layer by layer, whatever the block size."""
    import memlong.positions as positions
    from memlong.attention import rotate

    ml, _ = make_tiny(local_window=512, ingest_step=256, kv_source=kv_source, retrieval_layers="upper")
    ids = ml.ingest(TEXT, namespace="doc", progress=False).chunk_ids
    memory = ml.memory_for(ids[:3], "doc")
    stream = ml.stream("cache", doc_id="d")
    with torch.no_grad():
        stream.step(ml.tokenize(TEXT)[:256])
    cache = {layer: (k[None], v[None]) for layer, (k, v) in enumerate(zip(*stream.cache))}  # per layer, as callers give
    m, c = memory[0].shape[2], stream.cache_len
    sink = positions.sink_kv(ml)
    expected = {}
    for layer in range(ml.num_layers):
        keys = [rotate(sink[layer][0], *positions.rope(ml, torch.zeros(1, dtype=torch.long))),
                rotate(cache[layer][0], *positions.rope(ml, torch.arange(c) + 1 + m))]
        values = [sink[layer][1], cache[layer][1]]
        if layer in ml.config.retrieval_layers:
            src = ml.config.source_index(layer)
            keys.insert(0, rotate(memory[0][src][None], *positions.rope(ml, torch.arange(m) + 1)))
            values.insert(0, memory[1][src][None])
        expected[layer] = (torch.cat(keys, 2), torch.cat(values, 2))
    for block_bytes in (positions._ROTATE_BYTES, 1, memory[0][0].numel() * memory[0].element_size() * 2):
        monkeypatch.setattr(positions, "_ROTATE_BYTES", block_bytes)
        for given in (cache, stream.cache):  # per layer or stacked
            ctx, start = ml.context(memory, given)
            assert start == 1 + m + c and sorted(ctx.prefix) == list(range(ml.num_layers))
            for layer, (k, v) in expected.items():
                assert torch.equal(ctx.prefix[layer][0], k) and torch.equal(ctx.prefix[layer][1], v), (block_bytes, layer)
            assert ctx.memory_len == dict.fromkeys(ml.config.retrieval_layers, m)


def test_captured_layers_are_unrotated_together_as_one_at_a_time(make_tiny):
    from memlong.attention import finish_capture, unrotate
    from memlong.positions import rope

    ml, _ = make_tiny()
    ctx = AttentionContext(capture=True)
    ctx.cos, ctx.sin = rope(ml, torch.arange(7) + 40)
    rotated = {layer: (torch.randn(1, ml.kv_heads, 7, ml.head_dim), torch.randn(1, ml.kv_heads, 7, ml.head_dim))
               for layer in (2, 0, 3, 1)}
    ctx.pending = dict(rotated)
    captured = finish_capture(ctx)
    assert list(captured) == [0, 1, 2, 3] and ctx.pending == {} and ctx.stacked[0].shape == (4, ml.kv_heads, 7, ml.head_dim)
    for layer, (k, v) in rotated.items():
        assert torch.equal(captured[layer][0], unrotate(k, ctx.cos, ctx.sin)) and torch.equal(captured[layer][1], v)
        assert torch.equal(ctx.stacked[0][layer], captured[layer][0][0])
    assert finish_capture(ctx) is captured  # nothing pending: unchanged


def test_the_sink_survives_a_failed_first_use_and_concurrent_first_calls(make_tiny, monkeypatch):
    """The sink's K-V are computed on first use; a first forward that raised (Ctrl-C, out of memory) left them
    empty for good, and a second thread arriving meanwhile got none: both then answered without the sink."""
    import threading

    import memlong.positions as positions
    from memlong.model import MemLong

    ml, _ = make_tiny()
    ids = ml.tokenize(TEXT)[:40]
    with torch.no_grad():
        expected = ml.run(ids).logits
        assert ml.sink_ids and positions.sink_kv(ml)
    ml.weights_changed()
    run, failed = MemLong.run, []

    def first_fails(self, *args, **kwargs):
        if not failed:
            failed.append(1)
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    monkeypatch.setattr(MemLong, "run", first_fails)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        run(ml, ids)
    monkeypatch.setattr(MemLong, "run", run)
    with torch.no_grad():
        assert torch.allclose(ml.run(ids).logits, expected, atol=1e-5)

    ml.weights_changed()
    slow, results = run, []

    def slow_sink(self, *args, **kwargs):  # the sink's forward takes a while: a second caller arrives meanwhile
        if kwargs.get("logits_for", "x") is None:
            threading.Event().wait(0.3)
        return slow(self, *args, **kwargs)

    monkeypatch.setattr(MemLong, "run", slow_sink)
    with torch.no_grad():
        threads = [threading.Thread(target=lambda: results.append(ml.run(ids).logits)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 2 and all(torch.allclose(r, expected, atol=1e-5) for r in results)


def test_no_tokens_is_a_clear_error_everywhere(make_tiny):
    """Review finding: empty token lists failed inside torch ('Size does not match', 'got torch.FloatTensor') and
    perplexity(score_last=0) returned ppl 1.0 with nothing scored."""
    ml, _ = make_tiny()
    prompt, target = ml.tokenize("The pass key is")[1:], ml.tokenize(" 12345")[1:]
    calls = [(lambda: ml.run([]), "No token ids"), (lambda: ml.score([], target), "at least one token before"),
             (lambda: ml.decode([], max_new_tokens=2), "at least one prompt token"),
             (lambda: ml.stream("s").step([]), "No token ids")]
    calls += [(lambda bad=bad: ml.perplexity(TEXT, score_last=bad), "score_last must be a positive")
              for bad in (0, -5, 2.5, True)]
    for call, needle in calls:
        with pytest.raises(ValueError, match=needle):
            call()
    assert ml.score(prompt, target).shape == (len(target),)


def test_the_wrapped_model_still_runs_padded_batches_like_stock_attention(make_tiny, tokenizer):
    """Outside-in review: MemLong(model) switches that model object to memlong's attention, whose mask builder
    returned no mask, so the caller's own padded batches attended to the padding (logits off by 0.8, no error).
    Now a padded plain forward gets SDPA's mask; a forward with memory refuses padding."""
    ml, reference = make_tiny()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    long, short = ml.tokenize("Hello there, my friend, how are you"), ml.tokenize("Hi")
    ids = torch.tensor([long, [pad] * (len(long) - len(short)) + short])
    mask = torch.tensor([[1] * len(long), [0] * (len(long) - len(short)) + [1] * len(short)])
    with torch.no_grad():
        batched = ml.model(input_ids=ids, attention_mask=mask).logits
        want = [reference(input_ids=torch.tensor([row])).logits[0, -1] for row in (long, short)]
        assert torch.allclose(batched[0, -1], want[0], atol=1e-4) and torch.allclose(batched[1, -1], want[1], atol=1e-4)
        with pytest.raises(ValueError, match="padded batches"):
            ml.model(input_ids=ids, attention_mask=mask, memlong_context=ml.context(None)[0])


def test_forward_labels_and_tokenize_input_are_checked(make_tiny):
    """Outside-in fuzz: forward() labels out of the vocabulary gave cross_entropy's IndexError, float labels a dtype
    RuntimeError; tokenize() of a lone surrogate a tokenizers TypeError, of bytes a transformers ValueError."""
    ml, _ = make_tiny()
    ids = torch.tensor([ml.tokenize("The pass key is 12345.")])
    vocab = ml.model.get_input_embeddings().num_embeddings
    for bad, needle in ((torch.full_like(ids, vocab), f"label {vocab} is not a token id"),
                        (torch.full_like(ids, -5), "label -5 is not a token id"),
                        (ids.float(), "labels must be an integer tensor"), (ids.tolist(), "labels must be an integer"),
                        (ids[:, 1:], "do not match the segment")):
        with pytest.raises(ValueError, match=needle):
            ml.forward(ids, labels=bad)
    masked = ids.clone()
    masked[0, :3] = -100
    loss = ml.forward(ids, labels=masked)["loss"]
    assert torch.isfinite(loss)
    for dtype in (torch.int32, torch.int16):  # int32 failed in cross_entropy; int16 wrapped the vocabulary size
        assert torch.equal(ml.forward(ids, labels=masked.to(dtype))["loss"], loss)
    with pytest.raises(ValueError, match="surrogate"):
        ml.tokenize("a\udc80b")
    for bad in (None, b"bytes"):
        with pytest.raises(TypeError, match="text must be a string"):
            ml.tokenize(bad)


def test_perplexity_into_an_empty_namespace_name_is_refused_and_leaves_nothing(make_tiny):
    """Outside-in review: perplexity(namespace="") streamed into a scratch namespace it never reset (namespace
    ``""`` counted as "not given" for the name, as given for the cleanup), which the next save wrote to disk."""
    ml, _ = make_tiny()
    with pytest.raises(ValueError, match="namespace must be a non-empty string"):
        ml.perplexity(TEXT, score_last=16, namespace="")
    ml.perplexity(TEXT, score_last=16)  # a scratch namespace, reset afterwards
    assert ml.bank.namespaces() == [] and len(ml.bank) == 0


@pytest.mark.parametrize("score_last", [512, 300])
def test_perplexity_scores_exactly_the_last_tokens_asked_for(make_tiny, score_last):
    """Evaluation review: with len(tokens) - score_last a multiple of the step, the step whose last logit predicts
    the first scored token was skipped: 511 tokens scored for 512 (every benchmark over 8,192 tokens or 3,072-token
    tails hit it). The window here holds the whole text, so the figure equals full attention."""
    from memlong.evaluation import perplexity_modes

    ml, reference = make_tiny(local_window=1024)
    tokens = (ml.tokenize(TEXT * 3))[:1024]
    assert len(tokens) == 1024 and ml.config.step == 512
    with torch.no_grad():
        logits = reference(torch.tensor([ml.sink_ids + tokens])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits[-score_last:], torch.tensor(tokens[-score_last:]))
    got = ml.perplexity(tokens, score_last=score_last, use_memory=False)
    assert got["scored_tokens"] == score_last
    assert abs(got["ppl"] - float(torch.exp(nll))) < 1e-3 * got["ppl"]
    # full attention cannot score more tokens than the model has positions: it scored other tokens than the rest
    with pytest.raises(ValueError, match=f"Full attention can score at most {ml.max_positions - 1} tokens"):
        perplexity_modes(ml, " word" * (ml.max_positions + 50), score_last=ml.max_positions, modes=("full",))


def test_token_ids_outside_the_vocabulary_or_not_integers_are_named(make_tiny):
    """Outside-in audit: ids out of the vocabulary gave torch's 'IndexError: index out of range in self' (run,
    decode, score, Stream.step, perplexity), float ids an embedding dtype error, text a 'new(): invalid data type'."""
    ml, _ = make_tiny()
    vocab = ml.model.get_input_embeddings().num_embeddings
    prompt = ml.tokenize("The pass key is")[1:]
    for call, bad in [(lambda: ml.run([vocab, 5]), vocab), (lambda: ml.run([5, -1]), -1),
                      (lambda: ml.decode([vocab + 3], max_new_tokens=2), vocab + 3),
                      (lambda: ml.score(prompt, [-1]), -1), (lambda: ml.stream("s").step([vocab] * 4), vocab),
                      (lambda: ml.perplexity([vocab + 5, 2, 3], score_last=2), vocab + 5)]:
        with pytest.raises(ValueError, match=rf"Token id {bad} is outside the vocabulary 0\.\.{vocab - 1}"):
            call()
    with pytest.raises(TypeError, match="Token ids must be integers, got torch.float32"):
        ml.run([1.5, 2.5])
    with pytest.raises(TypeError, match="got text 'hello': tokenize it first"):
        ml.run("hello")
    assert ml.bank.namespaces() == []  # the stream and perplexity stored nothing
    assert ml.run(np.array(prompt)).logits.shape[1] == len(prompt)  # numpy ids still run
    assert ml.run(np.array(prompt, dtype=np.uint16)).logits.shape[1] == len(prompt)  # min/max of uint16 failed


def test_hand_built_memory_of_the_wrong_shape_is_named(make_tiny):
    """Outside-in audit: run(ids, memory=(k, v)) with other layer/head counts, k/v of different lengths, a single
    tensor or numpy arrays failed deep in positions.py with raw RuntimeError/IndexError/AttributeError."""
    ml, _ = make_tiny(local_window=256, ingest_step=128)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    keys, values = ml.memory_for(stats.chunk_ids[:2], "doc")
    ids = ml.encode_prompt("Where?")
    for memory, error, needle in [((keys[:2], values[:2]), ValueError, "expects"),
                                  ((keys[:, :1], values[:, :1]), ValueError, "expects"),
                                  ((keys, values[:, :, :10]), ValueError, "of one shape"),
                                  ((keys.long(), values.long()), ValueError, "floating-point"),
                                  ((keys[0], values[0]), ValueError, r"\(L_src, Hkv, M, D\)"),
                                  (keys, TypeError, "pair of tensors"),
                                  ((keys.numpy(), values.numpy()), TypeError, "pair of tensors")]:
        with pytest.raises(error, match=needle):
            ml.run(ids, memory=memory)
    assert ml.run(ids, memory=(keys, values)).logits.shape[1] == len(ids)


def test_a_batch_of_several_sequences_is_refused_not_flattened_into_one(make_tiny):
    """Outside-in audit: forward() of a (2, N) batch silently ran the two sequences as one of 2N tokens (view(-1));
    run() of a 2-D tensor failed in the rotary embedding. MemLong runs one sequence at a time."""
    ml, _ = make_tiny()
    ids = torch.tensor([ml.tokenize(TEXT)[:20]])  # (1, 20)
    batch = ids.view(2, 10)
    for call in (lambda: ml.forward(batch, namespace="doc"), lambda: ml.run(batch),
                 lambda: ml.forward(batch, labels=batch, namespace="doc")):
        with pytest.raises(ValueError, match=r"shape \(2, 10\) are a batch of sequences.*one sequence at a time"):
            call()
    with pytest.raises(ValueError, match=r"labels of shape \(1, 5\) do not match the segment's 20 tokens"):
        ml.forward(ids, labels=ids[:, :5], namespace="doc")
    assert ml.forward(ids, labels=ids, namespace="doc")["logits"].shape[:2] == (1, 20)  # (1, T) as before
    assert ml.run(ids).logits.shape[:2] == (1, 20)


def test_text_arguments_of_the_wrong_type_or_invalid_unicode_are_named(make_tiny):
    """Outside-in audit: ingest(None/123) failed in list(), ingest(b"bytes") said 'Document 0 is empty', generate(123)
    called the prompt empty, answer_prefix=None / query=5 failed in the tokenizer or as 'query vector has dimension
    1', and a lone surrogate ('abc \\udc80') gave a tokenizers TypeError."""
    ml, _ = make_tiny(local_window=256, ingest_step=128)
    ml.ingest(TEXT, namespace="doc", progress=False)
    before = ml.bank.chunk_ids("doc")
    for call, needle in [(lambda: ml.ingest(None, namespace="doc"), "texts .* must be a string, got NoneType"),
                         (lambda: ml.ingest(123, namespace="doc"), "texts .* must be a string, got int"),
                         (lambda: ml.ingest(b"bytes", namespace="doc"), r"got bytes .*decode bytes first"),
                         (lambda: ml.ingest(["ok text", 5], namespace="doc"), "Document 1 must be a string, got int"),
                         (lambda: ml.generate(123, namespace="doc"), "prompt must be a string, got int"),
                         (lambda: ml.generate("Where?", namespace="doc", answer_prefix=None),
                          "answer_prefix must be a string, got NoneType"),
                         (lambda: ml.generate("Where?", namespace="doc", query=5), "query must be a string, got int")]:
        with pytest.raises(TypeError, match=needle):
            call()
    surrogate = r"not valid Unicode.*encode\('utf-8', 'replace'\)\.decode\(\)"
    for call, what in [(lambda: ml.ingest("abc \udc80 def", namespace="doc"), "Document 0"),
                       (lambda: ml.generate("key \ud800 ?", namespace="doc"), "prompt")]:
        with pytest.raises(ValueError, match=f"{what} is {surrogate}"):
            call()
    assert ml.bank.chunk_ids("doc") == before and ml.bank.namespaces() == ["doc"]


def test_two_documents_under_one_doc_id_are_refused_as_upsert_entries_are(make_tiny):
    """Outside-in audit: ingest(["a b", "c d"], doc_ids=["x", "x"]) merged the two documents under one id silently
    (memlong.upsert.ingest_entries refuses the same thing)."""
    ml, _ = make_tiny(local_window=256, ingest_step=128)
    with pytest.raises(ValueError, match="doc_ids name 'x' twice; each document needs its own id.*Nothing was ingested"):
        ml.ingest(["one two three", "four five six"], namespace="d", doc_ids=["x", "x"], progress=False)
    assert ml.bank.namespaces() == []
    ml.ingest(["one two three", "four five six"], namespace="d", doc_ids=["x", "y"], progress=False)
    assert sorted(ml.bank.doc_chunk_ids("d")) == ["x", "y"]


@pytest.mark.parametrize("context, strip", [("document", False), ("chunk", False), ("chunk", True)])
def test_the_ingest_progress_bar_counts_tokens_read_not_started(make_tiny, monkeypatch, context, strip):
    """Review finding: the bar was advanced before each step ran, so it showed a step's tokens as read while they
    were still being read (1,792 tokens 3 s into an 80k ingest, "482 tok/s", then ~200 tok/s)."""
    import tqdm.auto

    from memlong.streaming import Stream

    ml, _ = make_tiny(chunk_size=16, local_window=64)
    done, seen = [0], []
    step = Stream.step

    def counted(self, tokens, **kwargs):
        out = step(self, tokens, **kwargs)
        done[0] += 1
        return out

    class Bar(tqdm.auto.tqdm):
        def update(self, n=1):
            seen.append((n, done[0]))
            return super().update(n)

    monkeypatch.setattr(Stream, "step", counted)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    stats = ml.ingest([TEXT[:900], TEXT[900:1500]], namespace="bar", context=context, strip=strip, progress=True)
    assert sum(n for n, _ in seen) == stats.tokens and [d for _, d in seen] == list(range(1, done[0] + 1))
