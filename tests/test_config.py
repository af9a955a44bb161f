import pytest

from memlong import MemLongConfig


def test_paper_defaults_for_26_layers():
    cfg = MemLongConfig(kv_source="memory_layer").resolve(26)
    assert cfg.memory_layer == 13
    assert cfg.retrieval_layers == (13, 17, 21, 25)
    assert cfg.source_layers == (13,)
    assert cfg.source_index(21) == 0


def test_per_layer_default_and_named_layer_sets():
    assert MemLongConfig().resolve(30).retrieval_layers == tuple(range(30))
    cfg = MemLongConfig(retrieval_layers="upper").resolve(30)
    assert cfg.retrieval_layers == tuple(range(15, 30))
    assert cfg.source_layers == cfg.retrieval_layers
    assert cfg.source_index(17) == 2


def test_ingest_steps_a_window_less_one_chunk_only_when_nothing_is_retrieved_while_storing():
    assert (MemLongConfig().store_step, MemLongConfig().step) == (896, 512)  # ingest vs scoring/training
    assert MemLongConfig(ingest_top_k=4).store_step == 512  # retrieving while storing: half-window steps
    assert MemLongConfig(ingest_step=256).store_step == MemLongConfig(ingest_step=256).step == 256  # set: used
    assert MemLongConfig(local_window=1000, chunk_size=128).store_step == 768  # whole chunks only
    assert MemLongConfig(local_window=200, chunk_size=128).store_step == 128  # at least one chunk


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_source": "memory_layer", "memory_layer": 10, "retrieval_layers": (5, 12)}, "below memory_layer"),
        ({"retrieval_layers": (0, 40)}, "out of range"),
        ({"memory_layer": 26}, "memory_layer must be in 0..25"),
        ({"kv_source": "both"}, "kv_source"),
        ({"position_layout": "rotated"}, "position_layout"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"ingest_step": 100}, "multiple of chunk_size"),
        ({"memory_capacity": 64}, "at least one chunk"),
        ({"evict_oldest": 0.6, "keep_newest": 0.5}, "sum to at most 1"),
        ({"ingest_step": 64.0}, "ingest_step must be a positive integer"),  # passed, then failed inside ingest
        ({"chunk_size": True}, "chunk_size must be a positive integer"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"ingest_top_k": False}, "ingest_top_k must be None or an integer"),
        ({"memory_dtype": "int8"}, "memory_dtype"),
        ({"retrieval_layers": "middle"}, "retrieval_layers"),
    ],
)
def test_invalid_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemLongConfig(**kwargs).resolve(26)


def test_config_accepts_the_eviction_shares_the_bank_accepts():
    from test_persistence import HashEmbedder

    from memlong import MemoryBank

    MemoryBank(embedder=HashEmbedder(), evict_oldest=0.5, keep_newest=0.5)
    MemLongConfig(evict_oldest=0.5, keep_newest=0.5).resolve(26)  # was refused by the config only


def test_resolve_does_not_mutate_and_step_default():
    cfg = MemLongConfig(local_window=1024)
    resolved = cfg.resolve(26)
    assert cfg.retrieval_layers is None and resolved.retrieval_layers is not None
    assert resolved.step == 512


def test_cli_per_command_top_k_defaults_do_not_leak_into_other_commands():
    from memlong.cli import _config, build_parser

    parser = build_parser()
    resolved = lambda argv: _config(parser.parse_args(argv)).get("top_k", MemLongConfig().top_k)
    assert resolved(["eval", "ppl"]) == 8 and resolved(["eval", "passkey"]) == 8
    assert resolved(["demo"]) == 4
    assert resolved(["eval", "icl"]) == 8  # ICL retrieves --memory-k demonstrations; top_k keeps the library default
    assert resolved(["eval", "ppl", "--top-k", "2"]) == 2
    # train-reader runs with the window its teacher needs (it failed with its own defaults); nowhere else
    window = lambda argv: _config(parser.parse_args(argv)).get("local_window", MemLongConfig().local_window)
    assert window(["train-reader", "--output", "r"]) == 2048 and window(["demo"]) == window(["eval", "ppl"]) == 1024
    assert window(["train-reader", "--output", "r", "--local-window", "4096"]) == 4096


def test_module_docstring_examples_hold():
    """The examples in memlong/config.py's, memlong/dtypes.py's and memlong/choices.py's docstrings are doctests."""
    import doctest

    import memlong.choices
    import memlong.config
    import memlong.dtypes

    for module in (memlong.config, memlong.dtypes, memlong.choices):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"retrieval_layers": ("a",)}, "retrieval_layers must be a list of integer layer indices"),
        ({"retrieval_layers": 5}, "retrieval_layers must be a list of integer layer indices"),
        ({"retrieval_layers": (1.5, 2)}, "retrieval_layers must be a list of integer layer indices"),  # was (1, 2)
        ({"memory_layer": True}, "memory_layer must be None .* or an integer layer index"),  # was layer 1
        ({"evict_oldest": "0.1"}, r"evict_oldest must be a share \(a number\) in \[0, 1\)"),  # raw TypeError
        ({"keep_newest": None}, "keep_newest must be a share"),
        ({"attention_sink": "no"}, "attention_sink must be True or False"),  # a truthy string was accepted
        ({"memory_reader": "no"}, "memory_reader must be True or False"),
        ({"memory_temperature": float("inf")}, "memory_temperature must be a number > 0 and finite"),
        ({"memory_scale": float("inf")}, "memory_scale must be a number > 0 and finite"),
        ({"stream_compile": "no"}, "stream_compile must be True or False"),
        ({"local_window": 10000}, r"The default ingest_step is half of local_window \(10000 // 2 = 5000\), which "
                                  r"must be a multiple of chunk_size \(128\): use a local_window that is a multiple of "
                                  r"256 \(e.g. 9984\)"),
        ({"local_window": 300}, r"half of local_window \(300 // 2 = 150\), .* \(e.g. 256\)"),
        ({"local_window": 100}, r"local_window \(100\) must be at least chunk_size \(128\)\.$"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(kwargs, message):
    """Outside-in audit: these were accepted silently, or failed with a raw TypeError inside resolve."""
    with pytest.raises(ValueError, match=message):
        MemLongConfig(**kwargs).resolve(26)


def test_layer_indices_as_lists_or_ranges_still_resolve():
    assert MemLongConfig(retrieval_layers=[3, 1]).resolve(26).retrieval_layers == (1, 3)
    assert MemLongConfig(retrieval_layers=range(24, 26)).resolve(26).retrieval_layers == (24, 25)
    assert MemLongConfig(retrieval_layers=[2, 2], memory_layer=0).resolve(26).retrieval_layers == (2,)
    # values that resolved before the type checks still do (a review of the checks' diff)
    import fractions

    import numpy as np

    assert MemLongConfig(retrieval_layers=np.arange(24, 26)).resolve(26).retrieval_layers == (24, 25)
    for fine in ({"memory_reader": 0}, {"memory_reader": 1}, {"attention_sink": np.True_},
                 {"evict_oldest": np.float32(0.1)}, {"keep_newest": fractions.Fraction(1, 10)}):
        MemLongConfig(**fine).resolve(26)


def test_a_dict_as_the_config_is_refused_with_the_fix(tiny_hf, tokenizer, embedder):
    """Outside-in audit: MemLong(model, tokenizer, {...}) failed with AttributeError: 'dict' has no 'resolve'."""
    from memlong import MemLong

    with pytest.raises(TypeError, match=r"config must be a MemLongConfig, got dict: pass MemLongConfig\(\*\*options\)"):
        MemLong(tiny_hf, tokenizer, {"top_k": 3}, embedder=embedder)


def test_numpy_scalars_are_plain_numbers_in_the_resolved_config():
    """Outside-in fuzz: top_k=np.int64(4) was refused as "top_k must be an integer >= 0, got np.int64(4)" (so were
    chunk_size, local_window, ...), while numpy floats and layer indices passed; stream_compile=0 was refused where
    attention_sink=0 passed. Numpy scalars are now plain Python values (the config is saved as JSON)."""
    import json

    import numpy as np

    cfg = MemLongConfig(top_k=np.int64(4), chunk_size=np.int32(64), local_window=np.int64(512),
                        kv_refresh=np.float32(0.25), attention_sink=np.bool_(True), stream_compile=0).resolve(26)
    assert (cfg.top_k, cfg.chunk_size, cfg.local_window) == (4, 64, 512) and type(cfg.top_k) is int
    assert type(cfg.kv_refresh) is float and cfg.attention_sink is True
    json.dumps(cfg.to_dict())


def test_a_path_and_a_list_of_layers_are_saved_as_json(tmp_path):
    """API review: ``memory_path=Path(...)`` was accepted but ``to_dict()`` (written into adapter.json at the end of
    training) was not JSON; a list of retrieval layers (as the docs write it) stays a list of ints."""
    import json
    from pathlib import Path

    cfg = MemLongConfig(memory_path=Path(tmp_path / "bank"), retrieval_layers=[3, 1, 2])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["memory_path"] == str(tmp_path / "bank") and data["retrieval_layers"] == [3, 1, 2]
    assert json.loads(json.dumps(cfg.resolve(4).to_dict()))["retrieval_layers"] == [1, 2, 3]
