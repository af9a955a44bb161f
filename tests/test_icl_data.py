"""ICL on the user's own labeled files (issue 19): CSV / TSV / JSONL, label words, one-line errors for bad
input, the four conditions' layouts (exactness on the tiny model) and `memlong eval icl --data` end to end."""

import json

import pytest
import torch

from memlong.cli import main
from memlong.icl import CONDITIONS, DEFAULTS, draw_sets, icl_eval
from memlong.icl_conditions import ConditionRunner
from memlong.icl_data import ICLTask, check_sizes, label_token_ids, load_labeled_file, parse_label_words
from memlong.icl_memory import STORAGES, store_demos

ROWS = [(f"the {w} was {adj}", lab) for w in ("film", "plot", "cast", "score", "script", "ending")
        for adj, lab in (("wonderful", "pos"), ("awful", "neg"))]


def write_csv(path, rows=ROWS, header=("text", "label"), sep=","):
    lines = [sep.join(header)] + [sep.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_tsv_and_jsonl_read_the_same_pairs(tmp_path):
    csv_task = load_labeled_file(write_csv(tmp_path / "d.csv"))
    tsv_task = load_labeled_file(write_csv(tmp_path / "d.tsv", sep="\t"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab, "id": i})
                                                for i, (t, lab) in enumerate(ROWS)) + "\n\n")
    jsonl_task = load_labeled_file(tmp_path / "d.jsonl")
    assert csv_task.pairs == tsv_task.pairs == jsonl_task.pairs == tuple(ROWS)
    assert csv_task.labels == ["neg", "pos"] and "neg, pos" in csv_task.instruction


def test_columns_label_words_and_quoted_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('stars,review\n5,"great, really great\nfilm"\n1,dull\n5,fine\n', encoding="utf-8")
    task = load_labeled_file(path, text_column="review", label_column="stars", label_words="1=bad,5=good",
                             field="Review")
    assert task.pairs == (("great, really great film", "good"), ("dull", "bad"), ("fine", "good"))
    assert task.labels == ["bad", "good"] and task.field == "Review"
    assert parse_label_words({"a": "x"}) == {"a": "x"}


@pytest.mark.parametrize("content, needles", [
    (b"", ["is empty", "header row"]),
    (b"  \n\n", ["is empty"]),
    ("text,label\ncaf\u00e9,a\nx,b\n".encode("latin-1"), ["not UTF-8", "0xe9", "iconv"]),
    (b"sentence,label\nx,a\ny,b\n", ["Column 'text' not found", "columns found: 'sentence', 'label'", "--text-column"]),
    (b"text,class\nx,a\ny,b\n", ["Column 'label' not found", "--label-column"]),
    (b"text,label\n", ["no examples"]),
    (b"text,label\nx,a\ny,a\nz,a\n", ["one class", "'a'", "at least two"]),
    (b"text,label\nx,a\n ,b\n", ["line 3", "no text", "column 'text'"]),
    (b"text,label\nx,a\ny,\n", ["line 3", "no label"]),
    # review findings: these were read wrongly without an error
    (b"text,label,label\nx,a,b\ny,b,a\n", ["names column 'label' twice"]),
    (b"text,label\nx,a\ngood, but long,b\n", ["line 3", "another number of fields", 'quote a text']),
    (b"text,label\nx,a\ny\n", ["line 3", "another number of fields"]),
    (("text,label\n" + "".join(f"sentence {i},word{i}\n" for i in range(30))).encode(), ["30 different values",
                                                                                          "--label-column"]),
])
def test_bad_files_get_one_line_errors_naming_the_fix(tmp_path, content, needles):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_labeled_file(path)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("name, content, kwargs, needle", [
    ("d.txt", "text,label\nx,a\ny,b\n", {}, "extension '.txt'"),
    ("d.jsonl", '{"text": "x", "label": "a"}\n[1, 2]\n', {}, "Line 2"),
    ("d.jsonl", '{"text": "x", "label": "a"}\n{oops\n', {}, "not valid JSON"),
    ("d.jsonl", '{"sentence": "x", "label": "a"}\n', {}, "columns found: 'sentence', 'label'"),
    ("d.csv", "text,label\nx,a\ny,b\n", {"label_words": "a=alpha"}, "no word for label(s) ['b']"),
    ("d.csv", "text,label\nx,a\ny,b\n", {"label_words": "a=same,b=same"}, "same word"),
    ("d.csv", "text,label\nx,a\ny,b\n", {"label_words": "a:alpha"}, "not LABEL=WORD"),
])
def test_other_file_errors(tmp_path, name, content, kwargs, needle):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_labeled_file(tmp_path / name, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_labeled_file(tmp_path / "missing.csv")


def test_labels_whose_first_tokens_collide_are_named(tokenizer):
    ids = lambda text: tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match=r"Labels 'abc1' and 'abc2' both start with the token #\d+.*--label-words"):
        label_token_ids(ids, ["abc1", "abc2"])
    assert len(set(label_token_ids(ids, ["negative", "positive"]))) == 2


def test_sizes_the_data_cannot_fill_are_refused():
    task = ICLTask("mini", tuple(ROWS), "Classify.", "Text")  # 12 examples, 6 per label
    with pytest.raises(ValueError, match=r"test set \(20 sentences\) is larger than the data \(mini: 12"):
        check_sizes(task, n_test=20, shots=0, memory_demos=0)
    with pytest.raises(ValueError, match=r"need 4 \+ 2 \+ 8 = 14.*--memory-demos"):
        check_sizes(task, n_test=4, shots=2, memory_demos=8)
    skewed = ICLTask("skew", tuple(ROWS[:10]) + (("x", "neg"), ("y", "neg")), "Classify.", "Text")  # 7 neg, 5 pos
    with pytest.raises(ValueError, match="need more examples of some labels.*'pos'"):
        check_sizes(skewed, n_test=6, shots=2, memory_demos=4)
    check_sizes(task, n_test=4, shots=2, memory_demos=6)  # exactly fits


def test_sets_are_disjoint_balanced_and_memory_sets_nest():
    task = ICLTask("mini", tuple(ROWS * 1) + tuple((f"extra {i}", "pos" if i % 2 else "neg") for i in range(40)),
                   "Classify.", "Text")
    test, shots, mem = draw_sets(task, 0, 6, 2, 20)
    assert not (set(test) & set(shots)) and not (set(test) & set(mem)) and not (set(shots) & set(mem))
    assert sorted(lab for _, lab in test) == ["neg"] * 3 + ["pos"] * 3
    assert sorted(lab for _, lab in mem) == ["neg"] * 10 + ["pos"] * 10
    _, _, small = draw_sets(task, 0, 6, 2, 8)
    assert set(small) <= set(mem) and draw_sets(task, 0, 6, 2, 8)[0] == test  # nested; same test set


def test_a_text_given_twice_is_never_both_tested_and_shown():
    """Evaluation review: a noisy file with a text under two labels put it in the test set and, under the other
    label, among the prompt demonstrations (74 of 200 seeds), or twice in the test set."""
    clean = [(f"review {i}", "good" if i % 2 else "bad") for i in range(40)]
    noisy = ICLTask("noisy", tuple(clean + [(t, "bad" if lab == "good" else "good") for t, lab in clean[:20]]),
                    "Classify.", "Review")
    for seed in range(60):
        test, shots, mem = draw_sets(noisy, seed, 6, 4, 10)
        texts = [t for t, _ in test + shots + mem]
        assert len(texts) == len(set(texts)), seed
    assert draw_sets(ICLTask("clean", tuple(clean), "Classify.", "Review"), 3, 6, 4, 10) == \
        draw_sets(ICLTask("clean", tuple(clean + clean[:5]), "Classify.", "Review"), 3, 6, 4, 10)
    # the size check counts what the draw can use: 6 + 6 texts, 4 of the second six repeating the first
    tight = ICLTask("tight", tuple([(f"t{i}", "pos") for i in range(6)] + [(f"t{i}", "neg") for i in range(4)]
                                   + [(f"u{i}", "neg") for i in range(2)]), "Classify.", "Review")
    with pytest.raises(ValueError, match="has 8 examples but"):
        check_sizes(tight, n_test=6, shots=2, memory_demos=2)  # draw_sets returned 5 / 1 / 2, unbalanced


def _runner(ml, storage, k):
    task = ICLTask("mini", tuple(ROWS), "Classify each text: neg or pos.", "Text")
    test, shots, mem = draw_sets(task, 0, 2, 2, 6)
    store = store_demos(ml, mem, field=task.field, namespace="_icl-t", storage=storage, head=task.instruction)
    label_ids = label_token_ids(lambda t: ml.strip_sink(ml.tokenize(t)), task.labels)
    return ConditionRunner(ml, task, shots, label_ids, store, "similar", k), test


def test_cached_prefix_is_exact_and_one_demo_in_memory_equals_pasting_it(make_tiny):
    """The prompt conditions reuse their prefix's K-V: same logits as one forward. With one demonstration stored
    alone (storage='demo') and retrieved, memory is exactly that demonstration pasted after the sink."""
    ml, _ = make_tiny()
    runner, test = _runner(ml, "demo", 1)
    text = test[0][0]
    query = runner._ids(f"Text: {text}\nAnswer:")
    for condition, prefix in (("prompt", runner.head + runner.shots), ("zero_shot", runner.head)):
        cached, n, _ = runner.score(condition, text)
        with torch.no_grad():
            direct = ml.run(prefix + query, logits_for=slice(-1, None)).logits[0, -1, runner.label_ids]
        assert n == len(prefix) + len(query)
        torch.testing.assert_close(torch.tensor(cached), direct, atol=1e-4, rtol=1e-4)
    memory, n_mem, m = runner.score("prompt+memory", text)
    pasted, n_paste, _ = runner.score("prompt+retrieved_text", text)
    assert n_paste == n_mem + m and m > 0  # the pasted prompt is the memory prompt plus the demonstration
    torch.testing.assert_close(torch.tensor(memory), torch.tensor(pasted), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("storage", STORAGES)
def test_every_storage_stores_and_retrieves(make_tiny, storage):
    ml, _ = make_tiny()
    runner, test = _runner(ml, storage, 3)
    hits = runner.hits(test[0][0])
    assert 0 < len(hits) <= 3 and set(hits) <= set(runner.store.chunk_ids)
    if storage != "stream":  # one chunk per demonstration, each with its label
        assert len(runner.store.chunk_ids) == 6 and set(runner.store.labels.values()) == {"neg", "pos"}
        balanced = runner.store.retrieve(test[0][0], k=4, retrieval="balanced")
        assert sorted(runner.store.labels[c] for c in balanced) == ["neg", "neg", "pos", "pos"]
    assert runner.store.text(hits).count("Answer:") >= 1


def test_icl_eval_on_a_users_file_records_every_condition(make_tiny, tmp_path):
    ml, _ = make_tiny()
    task = load_labeled_file(write_csv(tmp_path / "d.csv"), label_words="neg=negative,pos=positive")
    records = icl_eval(ml, task=task, shots=2, memory_demos=6, n_test=4, seeds=(0,), memory_k=3, n_pasted=2,
                       progress=False)
    assert [r["condition"] for r in records] == list(CONDITIONS)
    by = {r["condition"]: r for r in records}
    assert by["prompt+retrieved_text"]["n"] == 2 and by["prompt"]["n"] == 4  # the pasted one on a prefix of the set
    assert all(len(r["outcomes"]) == r["n"] and sum(r["outcomes"]) == r["correct"] for r in records)
    assert by["prompt+memory"]["memory_tokens"] > 0 and by["prompt+memory"]["memory_demos"] == 6
    assert by["prompt+retrieved_text"]["prompt_tokens"] > by["prompt+memory"]["prompt_tokens"]
    assert by["prompt"]["prompt_tokens"] == by["prompt+memory"]["prompt_tokens"] > by["zero_shot"]["prompt_tokens"]
    for r in records:
        assert r["ci95_low"] <= r["accuracy"] <= r["ci95_high"] and r["task"] == "d.csv"
        assert (r["storage"], r["retrieval"], r["memory_k"]) == (DEFAULTS["storage"], DEFAULTS["retrieval"], 3)
    assert not [ns for ns in ml.bank.namespaces() if ns.startswith("_icl")]


def test_cli_defaults_match_the_library():
    from memlong.cli import build_parser

    args = build_parser().parse_args(["eval", "icl"])
    assert (args.storage, args.retrieval, args.memory_k) == (DEFAULTS["storage"], DEFAULTS["retrieval"],
                                                            DEFAULTS["memory_k"])


def test_cli_eval_icl_data_end_to_end(tiny_hf, tokenizer, tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "tiny"
    tiny_hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"sentence": t, "y": lab}) for t, lab in ROWS), encoding="utf-8")
    out = tmp_path / "icl.json"
    argv = ["eval", "icl", "--data", str(data), "--text-column", "sentence", "--label-column", "y",
            "--label-words", "neg=negative,pos=positive", "--model", str(model_dir), "--n-test", "4", "--shots", "2",
            "--memory-demos", "6", "--memory-k", "2", "--seeds", "0,1", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["seed"], r["condition"]) for r in records] == [(s, c) for s in (0, 1) for c in CONDITIONS]
    keys = {"task", "condition", "seed", "accuracy", "correct", "n", "shots", "memory_demos"}  # the old record
    assert all(keys | {"ci95_low", "ci95_high", "prompt_tokens", "memory_tokens"} <= set(r) for r in records)
    assert "prompt+memory" in capsys.readouterr().out
    # bad input: one line, exit 2, before any model loads
    from memlong.model import MemLong

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(MemLong, "from_pretrained", classmethod(refuse))
    assert main(argv[:4] + ["--n-test", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Column 'text' not found" in err
    argv_big = [a if a != "4" else "40" for a in argv]
    assert main(argv_big) == 2 and "larger than the data" in capsys.readouterr().err
    assert main(["eval", "icl", "--label-words", "a=b"]) == 2 and "--data" in capsys.readouterr().err


def test_tsv_keeps_quotes_as_text(tmp_path):
    (tmp_path / "d.tsv").write_text('text\tlabel\n"Brilliant," she said\tpos\nDull\tneg\n', encoding="utf-8")
    assert load_labeled_file(tmp_path / "d.tsv").pairs[0][0] == '"Brilliant," she said'
