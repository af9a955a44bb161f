"""The public core API: per-call generation stats, the run step, streams, decode/score, the sink helpers."""

import re
import time

import numpy as np
import pytest
import torch

from memlong.generation import Generation

TEXT = " ".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(120))


def test_interleaved_generations_keep_their_own_stats(make_tiny):
    ml, _ = make_tiny(local_window=512)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    a = ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:1],
                    max_new_tokens=3, stream=True)
    b = ml.generate("Which ship?", namespace="doc", chunk_ids=stats.chunk_ids[1:4], max_new_tokens=5, stream=True)
    assert isinstance(a, Generation) and ml.last_generation is b.stats  # the convenience: the latest started
    first_a, first_b = next(a), next(b)  # decoding interleaved
    text_a, text_b = first_a + a.text(), first_b + b.text()
    assert a.stats.chunk_ids == stats.chunk_ids[:1] and b.stats.chunk_ids == stats.chunk_ids[1:4]
    assert a.stats.memory_tokens == 128 and b.stats.memory_tokens == 3 * 128
    assert a.stats.new_tokens == 3 and b.stats.new_tokens == 5
    assert a.stats.prompt_tokens == len(ml.encode_prompt("Where does the red ship sail?"))
    assert text_a == ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:1],
                                 max_new_tokens=3)  # interleaving changed nothing
    assert text_b == ml.generate("Which ship?", namespace="doc", chunk_ids=stats.chunk_ids[1:4], max_new_tokens=5)


def test_decode_and_score_agree_with_run(make_tiny):
    ml, _ = make_tiny(local_window=512)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    memory = ml.memory_for(stats.chunk_ids[:2], "doc")
    ids = ml.encode_prompt("Line 7: the")
    g = ml.decode(ids, memory, max_new_tokens=1)
    with torch.no_grad():
        logits = ml.run(ids, memory=memory).logits[0]  # (T, V)
    first = int(logits[-1].argmax())
    assert g.text() == ml.tokenizer.decode([first], skip_special_tokens=True) and g.stats.memory_tokens == 256
    target = [first, 42]
    with torch.no_grad():
        full = torch.log_softmax(ml.run(ids + target, memory=memory).logits[0], -1)
    expected = torch.stack([full[len(ids) - 1, first], full[len(ids), 42]])
    torch.testing.assert_close(ml.score(ids, target, memory), expected, atol=1e-5, rtol=1e-5)


def test_stream_steps_store_what_ingest_stores(make_tiny):
    ml, _ = make_tiny(local_window=512, ingest_step=256)
    tokens = ml.tokenize(TEXT)
    stream = ml.stream("s", doc_id="d")
    for s in range(0, len(tokens), ml.config.step):
        logits = stream.step(tokens[s:s + ml.config.step], logits=True)
        assert logits.shape == (1, len(tokens[s:s + ml.config.step]), ml.model.config.vocab_size)
        assert stream.cache_len <= ml.config.local_window - ml.config.step
    stream.flush()
    assert stream.offset == len(tokens)
    ingested = ml.ingest(TEXT, namespace="i", doc_ids=["d"], progress=False)
    assert len(stream.chunk_ids) == len(ingested.chunk_ids)
    for a, b in zip(stream.chunk_ids, ingested.chunk_ids):
        ca, cb = ml.bank.get(a, namespace="s"), ml.bank.get(b, namespace="i")
        assert ca.span == cb.span and torch.allclose(ca.keys, cb.keys, atol=1e-5)


def test_sink_helpers_and_shapes(make_tiny):
    ml, _ = make_tiny()
    assert ml.sink_ids == [ml.tokenizer.bos_token_id]
    assert ml.strip_sink(ml.sink_ids + [5, 6]) == [5, 6] and ml.strip_sink([5, 6]) == [5, 6]
    assert (ml.kv_heads, ml.head_dim) == (2, 16)
    out = ml.run([5, 6, 7], capture=True, logits_for=None)
    assert out.logits is None and out.kv[0][0].shape == (1, 2, 3, 16) and out.next_position == 4  # after the sink
    ml.weights_changed()  # the sink's K-V are recomputed: same weights, same result
    torch.testing.assert_close(ml.run([5, 6, 7], capture=True, logits_for=None).kv[3][1], out.kv[3][1])
    torch.testing.assert_close(ml.run([5, 6, 7], positions=[1, 2, 3], logits_for=None, capture=True).kv[3][1],
                               out.kv[3][1])  # the default positions, given as a list
    for bad in ([1, 2], torch.arange(4), torch.tensor([1.0, 2.0, 3.0])):  # was a raw rotary-embedding error
        with pytest.raises(ValueError, match="one integer position per token"):
            ml.run([5, 6, 7], positions=bad)


def test_a_streamed_generation_never_turns_gradients_off_for_its_caller(make_tiny):
    """Grad mode is thread-global: a decode loop that kept `torch.no_grad()` open across its yields switched
    gradients off for the caller between pieces, and for good when an answer was abandoned at a stop string (a
    later training step then had no grad_fn)."""
    ml, _ = make_tiny(local_window=512)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    assert torch.is_grad_enabled()
    g = ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:2],
                    max_new_tokens=6, stream=True)
    next(g)
    assert torch.is_grad_enabled()  # between pieces
    del g  # abandoned midway, as an adapter does when a stop string completes
    assert torch.is_grad_enabled()
    for _ in ml.generate("Which ship?", namespace="doc", max_new_tokens=4, stream=True):
        assert torch.is_grad_enabled()


def test_a_generation_closed_early_still_records_its_time(make_tiny):
    """Adapters close a generation when their stop string completes: its stats still record the seconds it ran
    (measured from the call, prompt encoding included), as a generation run to the end does."""
    ml, _ = make_tiny(local_window=512)
    stats = ml.ingest(TEXT, namespace="doc", progress=False)
    g = ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:2],
                    max_new_tokens=8, stream=True)
    next(g)
    g.close()
    assert g.stats.seconds >= g.stats.time_to_first_token > 0 and g.stats.new_tokens < 8

    # determinism review: a stream handed on before it was read counted the wait before its first piece as its time
    waited = ml.generate("Where does the red ship sail?", namespace="doc", chunk_ids=stats.chunk_ids[:2],
                         max_new_tokens=8, stream=True)
    time.sleep(1.0)
    waited.text()
    assert 0 < waited.stats.time_to_first_token <= waited.stats.seconds < 1.0


def test_stop_strings_never_leak_even_in_part_and_one_string_is_one_stop(make_tiny):
    """Review finding: ``generate(stop=...)`` yielded each token before a stop string completed, so its start stayed in
    the output (``' Ophelia is'`` for stop ``'is a'``), and ``stop="princess"`` stopped at the first ``e``. Every stop
    that starts inside the answer, for every cut position, streamed or not; one string is one stop string."""

    ml, _ = make_tiny(local_window=512)
    prompt = "Line 7: the"
    full = ml.generate(prompt, retrieve=False, max_new_tokens=12)
    assert len(full) > 8
    pieces = list(ml.generate(prompt, retrieve=False, max_new_tokens=12, stream=True))
    assert "".join(pieces) == full and len(pieces) > 2
    for start in range(1, len(full) - 2):
        for length in (2, 3, 5):
            stop = full[start:start + length]
            if len(stop) < 2 or not stop.strip():
                continue
            want = full[:full.find(stop)]
            assert ml.generate(prompt, retrieve=False, max_new_tokens=12, stop=[stop, "\x00never"]) == want
            assert "".join(ml.generate(prompt, retrieve=False, max_new_tokens=12, stop=stop, stream=True)) == want
    assert ml.generate(prompt, retrieve=False, max_new_tokens=12, stop=full[2:] + "?") == full  # never completed
    stop = full[3:6]
    assert ml.generate(prompt, retrieve=False, max_new_tokens=12, stop=(s for s in [stop])) == full[:full.find(stop)]
    assert ml.generate(prompt, retrieve=False, max_new_tokens=np.int64(12), stop=None, temperature=np.float32(0)) == full
    assert ml.generate(prompt, retrieve=False, max_new_tokens=12, stop=["", full[3:5]]) == full[:full.find(full[3:5])]
    for bad, error in ((dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
                       (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature must be"),
                       (dict(temperature=float("nan")), "temperature"), (dict(stop=["a", 3]), "stop must be")):
        with pytest.raises((ValueError, TypeError), match=error):
            ml.generate(prompt, retrieve=False, **bad)


def test_seed_and_temperature_edges_sample_or_say_what_is_wrong(make_tiny):
    """Outside-in fuzz: a numpy seed raised TypeError, seed=1.5 / "7" / 2**64 torch's RuntimeError or an overflow;
    temperature=1e-300 (allowed: positive and finite) overflowed the logits and torch.multinomial refused the NaNs."""
    ml, _ = make_tiny(local_window=512)
    prompt = "Line 7: the"
    greedy = ml.generate(prompt, retrieve=False, max_new_tokens=6)
    assert ml.generate(prompt, retrieve=False, max_new_tokens=6, temperature=1e-300, seed=np.int64(3)) == greedy
    a, b = (ml.generate(prompt, retrieve=False, max_new_tokens=6, temperature=1.5, seed=seed)
            for seed in (np.uint64(2**64 - 1), 2**64 - 1))
    assert a == b
    assert ml.generate(prompt, retrieve=False, max_new_tokens=6, temperature=1.0, seed=-1)  # torch takes it
    for bad in (1.5, "7", 2**64, -2**63 - 1, True):
        with pytest.raises(ValueError, match="seed must be None or an integer"):
            ml.generate(prompt, retrieve=False, temperature=1.0, seed=bad)
    shape = (len(ml.config.source_layers), ml.kv_heads, 2, ml.head_dim)
    ids = ml.bank.add_chunks(["x"], keys=[torch.zeros(shape)], values=[torch.zeros(shape)])
    g = ml.generate(prompt, chunk_ids=ids * 3, max_new_tokens=1, stream=True)
    assert g.stats.chunk_ids == ids and g.stats.memory_tokens == 2  # the memory read once, and said so


def test_finish_reason_says_why_the_answer_ended(make_tiny):
    """``stats.finish_reason``: "length" when the budget ran out, "stop" at a stop string, even one that completes on
    the last allowed token (the LangChain adapter reported "length" there), "" when the caller closed it early."""
    ml, _ = make_tiny(local_window=512)
    prompt = "Line 7: the"
    g = ml.generate(prompt, retrieve=False, max_new_tokens=6, stream=True)
    full = "".join(g)
    assert g.stats.finish_reason == "length" and g.stats.new_tokens == 6
    before = ml.generate(prompt, retrieve=False, max_new_tokens=5)
    last = full[len(before):]
    assert full.startswith(before) and last and last not in before, (before, last)
    g = ml.generate(prompt, retrieve=False, max_new_tokens=6, stop=last, stream=True)
    assert "".join(g) == before and g.stats.new_tokens == 6 and g.stats.finish_reason == "stop"
    assert ml.last_generation.finish_reason == "stop"
    g = ml.generate(prompt, retrieve=False, max_new_tokens=6, stream=True)
    next(g)
    g.close()
    assert g.stats.finish_reason == ""


def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    """Review finding: a missing local path reached Hugging Face, which answered 'Repo id must be in the form ...'."""

    from memlong import MemLong

    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    for path in (str(tmp_path / "missing"), "./no-such-model", "~/no/such/model", "a/b/c", str(a_file)):
        with pytest.raises(ValueError, match="no such folder.*'default', a Hugging Face model id"):
            MemLong.from_pretrained(path)


def test_an_adapter_of_another_model_is_named_as_such(tiny_hf, tokenizer, tmp_path):
    """Review finding: the packaged adapter on a 4-layer model said 'memory_layer must be in 0..3' (and a reader an
    IndexError), not that the adapter belongs to another model."""

    from memlong import MemLong

    tiny_hf.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match=f"trained on 'default' .*has {tiny_hf.config.num_hidden_layers} layers"):
        MemLong.from_pretrained(str(tmp_path / "tiny"), adapter="shakespeare")


def test_from_pretrained_checks_every_option_before_the_weights_load(tiny_hf, tokenizer, tmp_path, monkeypatch):
    """Review finding: ``topk=4``, ``top_k=-1``, a missing adapter and ``device="cuda"`` without CUDA were found after
    the weights loaded (seconds here, minutes for a 7B model; the CLI said "every input is checked before a model
    loads"); ``device=torch.device("cpu")`` failed after the load with AttributeError 'startswith'."""
    import transformers

    from memlong import MemLong

    tiny_hf.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    path, load = str(tmp_path / "tiny"), transformers.AutoModelForCausalLM.from_pretrained

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    for options, error, message in [({"topk": 4}, TypeError, "'topk': did you mean 'top_k'"),
                                    ({"top_k": -1}, ValueError, "top_k"),
                                    ({"local_window": 8}, ValueError, "local_window"),
                                    ({"adapter": str(tmp_path / "missing")}, Exception, "missing"),
                                    *([({"device": "cuda"}, ValueError, "sees no CUDA GPU")]
                                      if not torch.cuda.is_available() else [])]:
        with pytest.raises(error, match=message):
            MemLong.from_pretrained(path, **options)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    assert MemLong.from_pretrained(path, device=torch.device("cpu"), chunk_size=16, local_window=64).device.type == "cpu"


def test_default_document_ids_do_not_depend_on_the_clock(make_tiny, monkeypatch):
    """Review finding: default doc ids were ``doc-{time.time_ns()}``; on a coarse clock (Windows) two documents got
    one id, and ``delete(doc_id=...)`` of one removed both."""
    import time

    ml, _ = make_tiny(local_window=512)
    monkeypatch.setattr(time, "time_ns", lambda: 1)
    ml.ingest([TEXT[:400], TEXT[400:800]], namespace="d", progress=False)
    ml.ingest(TEXT[800:1200], namespace="d", progress=False)
    docs = ml.bank.doc_chunk_ids("d")
    assert len(docs) == 3
    ml.bank.delete(namespace="d", doc_id=next(iter(docs)))
    assert len(ml.bank.doc_chunk_ids("d")) == 2


def test_a_batching_stream_writes_its_waiting_chunks_before_a_step_that_retrieves(make_tiny):
    """Review finding: with ``batch_writes`` a step that retrieves was stored before the batched steps before it
    (document order inverted) and could not retrieve them."""
    from memlong.streaming import Stream

    ml, _ = make_tiny(local_window=512, ingest_step=256)
    tokens = ml.tokenize(TEXT)
    stream = Stream(ml, "b", doc_id="d", batch_writes=True)
    for s, k in zip(range(0, 4 * 256, 256), (0, 0, 0, 2)):
        stream.step(tokens[s:s + 256], k=k)
    stream.flush()
    spans = [ml.bank.get(c, namespace="b").span for c in ml.bank.chunk_ids("b")]
    assert spans == sorted(spans) and len(spans) == len(set(spans))


def test_a_namespace_that_holds_nothing_reads_no_memory_and_says_so_in_its_stats_not_by_warning(make_tiny):
    """A generate on a namespace that holds nothing reads no memory, and its stats say so (memory_tokens 0, no
    chunk ids). No warning: one fired for every new tenant's first question (tenant-13 beside tenant-12 looks like a
    typo) and named other tenants' namespaces, which are hard boundaries; session 14 dropped it for that, and a
    difflib version of it came back in session 15 until the re-reading of the change."""
    import warnings

    ml, _ = make_tiny(local_window=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ml.generate("Where does the red ship sail?", max_new_tokens=1)  # an empty bank
        ml.ingest(TEXT, namespace="ships", progress=False)
        ml.ingest(TEXT[:400], namespace="tenant-12", progress=False)
        right = ml.generate("Where does the red ship sail?", namespace="ships", max_new_tokens=1, stream=True)
        right.text()
        assert right.stats.memory_tokens > 0 and right.stats.chunk_ids
        for empty in ("shipz", "tenant-13"):
            g = ml.generate("Where does the red ship sail?", namespace=empty, max_new_tokens=1, stream=True)
            g.text()
            assert g.stats.memory_tokens == 0 and g.stats.chunk_ids == []


def test_one_string_where_a_list_is_expected_is_refused_and_numpy_ids_work(make_tiny, tmp_path):
    """Outside-in audit: one string given for a list was split into characters (save_memory(namespaces="ha") saved
    namespaces 'h' and 'a'; memory_for/generate(chunk_ids="<id>") failed on its first letter; ingest({"a": "b"})
    ingested the key), and a numpy array of ids failed with numpy's "truth value ... is ambiguous"."""

    ml, _ = make_tiny(local_window=512)
    stats = ml.ingest(TEXT[:1500], namespace="h", progress=False)
    ml.ingest(TEXT[:300], namespace="a", progress=False)
    one = stats.chunk_ids[0]
    for fn, what in [(lambda: ml.memory_for(one, "h"), "chunk_ids"),
                     (lambda: ml.generate("Which ship?", namespace="h", chunk_ids=one, max_new_tokens=1), "chunk_ids"),
                     (lambda: ml.save_memory(tmp_path / "s", namespaces="ha"), "namespaces"),
                     (lambda: ml.ingest({"a": "b"}, namespace="x", progress=False), "texts"),
                     (lambda: ml.ingest(["a b", "c d"], namespace="x", doc_ids="xy", progress=False), "doc_ids")]:
        with pytest.raises(TypeError, match=f"{what} takes a list.*pass a list"):
            fn()
    assert not (tmp_path / "s").exists() and ml.bank.namespaces() == ["h", "a"]
    for bad in ([None], [5]):  # refused before the forward (the bank refused them only after it)
        with pytest.raises(ValueError, match=r"doc_ids\[0\] must be a string.*Nothing was ingested"):
            ml.ingest(["a b"], namespace="x", doc_ids=bad, progress=False)
    ml.save_memory(tmp_path / "s", namespaces=["h", "a"])
    with pytest.raises(TypeError, match="namespaces takes a list, got one str 'h'"):
        ml.load_memory(tmp_path / "s", namespaces="h")
    for path in (tmp_path / "s", str(tmp_path / "s")):  # a folder where namespaces go: its advice wrapped the path
        with pytest.raises(TypeError, match="got the path .*the folder is the first argument"):
            ml.load_memory(tmp_path / "s", namespaces=path)
    assert ml.load_memory(tmp_path / "s", namespaces=np.array(["h"])) == ["h"]
    ids = np.array(stats.chunk_ids[:2])
    assert ml.memory_for(ids, "h")[0].shape[2] == 256
    g = ml.generate("Which ship?", namespace="h", chunk_ids=ids, max_new_tokens=1, stream=True)
    g.text()
    assert g.stats.chunk_ids == stats.chunk_ids[:2] and all(type(c) is str for c in g.stats.chunk_ids)


def test_reset_takes_one_namespace_and_a_stream_checks_its_arguments_when_created(make_tiny):
    """Outside-in audit: ml.reset(["h"]) failed with "unhashable type: 'list'"; Stream("") / Stream(None) (and a bad
    doc_id or metadata) were accepted when created and failed only when the first step wrote, after its forward."""

    ml, _ = make_tiny(local_window=512)
    ml.ingest(TEXT[:600], namespace="h", progress=False)
    with pytest.raises(ValueError, match=r"namespace must be a non-empty string, got \['h'\]"):
        ml.reset(["h"])
    for namespace in ("", None):
        with pytest.raises(ValueError, match="namespace must be a non-empty string"):
            ml.stream(namespace)
    with pytest.raises(ValueError, match="doc_id must be a string, got int"):
        ml.stream("s", doc_id=5)
    with pytest.raises(ValueError, match="metadata JSON cannot store"):
        ml.stream("s", metadata={"x": {1}})
    assert ml.bank.namespaces() == ["h"]
    ml.reset("h")
    assert ml.bank.namespaces() == []


def test_score_refresh_and_save_take_what_run_takes_or_say_what_is_wrong(make_tiny, tmp_path):
    """Outside-in fuzz: score(ids, 5) failed with "'int' object is not iterable", score of a (1, T) tensor (which
    run() takes) with a confusing TypeError, refresh(None, ...) with "cannot unpack", save_memory(None) with
    pathlib's TypeError; a bare integer ran as a one-token prompt."""
    ml, _ = make_tiny(local_window=512)
    prompt, target = ml.encode_prompt("The pass key is"), ml.tokenize(" 12345")
    expected = ml.score(prompt, target)
    assert torch.equal(ml.score(torch.tensor([prompt]), torch.tensor(target)), expected)
    assert ml.score(prompt, []).shape == ml.score(prompt, np.array([], dtype=np.int64)).shape == (0,)
    for call in (lambda: ml.score(prompt, 5), lambda: ml.run(5)):
        with pytest.raises(TypeError, match="got one int: wrap it in a list"):
            call()
    with pytest.raises(TypeError, match="memory must be the .* that ml.memory_for"):
        ml.refresh(None, [], "default", share=0.5)
    with pytest.raises(TypeError, match="path must be a directory path"):
        ml.save_memory(None)


def test_namespace_none_is_refused_everywhere_and_run_output_repr_is_short(make_tiny):
    """API review: ``memory_for(ids, None)`` said "not in namespace None", ``stored(ids, namespace=None)`` returned
    [] and ``num_tokens(5)`` 0 (a wrong answer, not an error); ``repr(RunOutput)`` printed every layer's K-V
    (347,000 characters in a notebook); the search module's doctest expected another score."""
    import doctest

    import memlong.search

    ml, _ = make_tiny(chunk_size=16, local_window=64)
    ids = ml.ingest(TEXT[:300], namespace="d", progress=False).chunk_ids
    for call in (lambda: ml.memory_for(ids, None), lambda: ml.bank.stored(ids, namespace=None),
                 lambda: ml.bank.num_tokens(5), lambda: ml.bank.nbytes(""), lambda: ml.memory_for([], None),
                 lambda: ml.bank.fetch(ids, namespace=None)):
        with pytest.raises(ValueError, match="namespace must be a non-empty string"):
            call()
    assert ml.bank.num_tokens("d") > 0 and ml.bank.stored(ids, namespace="d") == ids
    out = ml.run(ml.tokenize("a b c"), memory=ml.memory_for(ids[:1], "d"), capture=True, logits_for=None)
    assert len(repr(out)) < 200 and "layers of (1, " in repr(out)
    assert doctest.testmod(memlong.search, optionflags=doctest.ELLIPSIS).failed == 0


def test_a_shared_bank_refuses_storage_options_it_does_not_have(make_tiny, tiny_hf, tokenizer, embedder, tmp_path):
    """Matrix review: ``MemLong(model, tok, MemLongConfig(memory_path=..., search_mode="lexical",
    memory_quantization="int8"), bank=shared)`` kept the shared in-memory dense float bank without a word (the user
    believed the K-V went to disk)."""
    from memlong import MemLong, MemLongConfig

    first, _ = make_tiny()
    shared = first.bank
    for options, named in (({"memory_path": str(tmp_path / "d")}, "memory_path"),
                           ({"search_mode": "lexical"}, "search_mode='lexical' (the bank's: 'dense')"),
                           ({"memory_quantization": "int8", "memory_capacity": 999}, "memory_quantization='int8'"),
                           ({"evict_oldest": 0.5, "keep_newest": 0.4}, "evict_oldest=0.5 (the bank's: 0.1)")):
        with pytest.raises(ValueError, match=f"uses it as it is, but its config sets .*{re.escape(named)}"):
            MemLong(tiny_hf, tokenizer, MemLongConfig(memory_dtype="float32", **options), bank=shared)
    with pytest.raises(TypeError, match="bank must be a MemoryBank"):
        MemLong(tiny_hf, tokenizer, MemLongConfig(), bank=first)
    second = MemLong(tiny_hf, tokenizer, MemLongConfig(memory_dtype="float32", top_k=2), bank=shared)  # as it is
    assert second.bank is shared
    assert MemLong(tiny_hf, tokenizer, MemLongConfig(memory_dtype="float16"), bank=shared).bank is shared  # default


def test_reprs_say_what_an_object_is_without_dumping_it(make_tiny, tmp_path):
    """API review: a disk bank's repr read as an in-memory bank's; a Chunk's repr printed its token ids and a
    ``<DenseKV object at 0x...>``; a Generation's was ``<... object at 0x...>``."""
    from memlong import MemoryBank

    ml, _ = make_tiny(chunk_size=16, local_window=64)
    ids = ml.ingest(TEXT[:300], namespace="d", progress=False).chunk_ids
    chunk = repr(ml.bank.get(ids[0], namespace="d"))
    assert "text=" in chunk and "tokens=" not in chunk and "object at" not in chunk
    g = ml.generate("Where?", namespace="d", chunk_ids=ids[:1], max_new_tokens=2, stream=True)
    g.text()
    assert repr(g).startswith("<Generation GenerationStats(") and "new_tokens=2" in repr(g)
    disk = MemoryBank(embedder=ml.bank.embedder, path=tmp_path / "b", quantization="int8", max_bytes=10**9)
    assert repr(disk).endswith(f"max_bytes=1000000000, quantization='int8', path={str(tmp_path / 'b')!r})")


def test_warnings_point_at_the_callers_line_whatever_the_depth(make_tiny, tmp_path):
    """Determinism review: warnings had fixed stack levels, right for one path only: an eviction pointed into
    streaming.py through ``ingest``, into upsert.py through a LangChain store, into bank_files.py on a load; the
    positions warning into loading.py through ``from_pretrained``."""
    import warnings

    from langchain_core.documents import Document

    from memlong import MemoryEvictionWarning
    from memlong_integrations.langchain import MemLongVectorStore

    ml, _ = make_tiny(local_window=512, memory_capacity=600)
    kv = torch.zeros(2, 2, 200, 16)
    store = MemLongVectorStore(ml, namespace="lc")
    calls = {
        "MemoryBank.add_chunks": lambda: ml.bank.add_chunks(["a"] * 4, keys=[kv] * 4, values=[kv] * 4,
                                                            namespace="bank"),
        "MemLong.ingest": lambda: ml.ingest(TEXT, namespace="doc", progress=False),
        "LangChain add_texts": lambda: [store.add_texts([TEXT[:700]]) for _ in range(3)],
        "LangChain add_documents": lambda: [store.add_documents([Document(TEXT[:700])]) for _ in range(3)],
        "MemoryBank.load(evict=True)": lambda: ml.bank.load(ml.bank.save(tmp_path / "bank"), embedder=ml.bank.embedder,
                                                            capacity=300, evict=True),
    }
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        evictions = [w for w in caught if issubclass(w.category, MemoryEvictionWarning)]
        assert evictions, name
        assert {w.filename for w in evictions} == {__file__}, (name, [(w.filename, w.lineno) for w in evictions])
