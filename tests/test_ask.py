"""`memlong ask` (memlong/ask.py): your files into memory, questions answered from it, a disk bank kept between runs."""

import json
import sys
from pathlib import Path

import pytest

from memlong.ask import LAYOUTS, add_files, ask, held_files, prompt_for, run_ask
from memlong.cli import main
from memlong.demo import DemoFact, plant_fact
from memlong.evaluation import shakespeare_text
from memlong.prompts import ROLE_STOP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TEXT = "\n".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(60))
GATE = DemoFact("The password of the castle gate is Brindlewick, chosen by the old captain of the guard.",
                "What is the password of the castle gate?", "The password of the castle gate is", "Brindlewick")


def test_files_are_ingested_once_replaced_when_changed_and_kept_apart(make_tiny, tmp_path):
    ml, _ = make_tiny(chunk_size=16, local_window=64)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    first = add_files(ml, {str(a): TEXT, str(b): "The abbey bell rings at noon. " * 8}, namespace="n", progress=False)
    assert [(r["file"], r["ingested"]) for r in first] == [(str(a), True), (str(b), True)]
    assert all(r["tokens"] > 0 and r["chunks"] > 0 for r in first)
    held = ml.bank.doc_chunk_ids("n")
    assert set(held) == {str(a.resolve()), str(b.resolve())}
    assert {ml.bank.get(c, namespace="n").metadata["file"] for c in ml.bank.chunk_ids("n")} == {str(a), str(b)}
    moved = add_files(ml, {str(tmp_path / "moved.txt"): TEXT}, namespace="n", progress=False)  # diff review: doubled
    assert moved[0]["ingested"] is False and ml.bank.doc_chunk_ids("n") == held
    same = add_files(ml, {str(b): TEXT}, namespace="n", progress=False)  # b.txt now holds a.txt's text
    assert same[0]["ingested"] is False and set(ml.bank.doc_chunk_ids("n")) == {str(a.resolve())}
    add_files(ml, {str(b): "The abbey bell rings at noon. " * 8}, namespace="n", progress=False)  # and back
    now = ml.bank.doc_chunk_ids("n")
    assert list(now) == [str(a.resolve()), str(b.resolve())] and now[str(a.resolve())] == held[str(a.resolve())]
    held = now

    again = add_files(ml, {str(a): TEXT}, namespace="n", progress=False)  # unchanged: not read again
    assert again == [{"file": str(a), "tokens": 0, "chunks": first[0]["chunks"], "ingested": False, "seconds": 0.0}]
    assert ml.bank.doc_chunk_ids("n") == held

    changed = add_files(ml, {str(a): "A new text about the harbour gate. " * 6}, namespace="n", progress=False)
    assert changed[0]["ingested"] and changed[0]["chunks"] != first[0]["chunks"]
    now = ml.bank.doc_chunk_ids("n")
    assert now[str(b.resolve())] == held[str(b.resolve())]  # the other file untouched
    assert not set(now[str(a.resolve())]) & set(held[str(a.resolve())])  # the old chunks of a.txt are gone
    assert all("harbour" in ml.bank.get(c, namespace="n").text for c in now[str(a.resolve())][:1])


def test_ask_records_its_sources_and_cuts_the_answer_at_a_blank_line(make_tiny, capsys):
    ml, _ = make_tiny(chunk_size=16, local_window=128, top_k=2)
    add_files(ml, {"ships.txt": TEXT}, namespace="n", progress=False)
    for layout in LAYOUTS:
        record = ask(ml, "Where does the red ship sail?", namespace="n", max_new_tokens=12, layout=layout, echo=True)
        assert record["layout"] == layout and "\n\n" not in record["answer"] and record["answer"] == \
            record["answer"].strip()
        assert [s["file"] for s in record["sources"]] == ["ships.txt"] * 2  # the path as given
        assert all(ml.bank.get(s["chunk_id"], namespace="n").text.split()[0] in s["text"] for s in record["sources"])
    out = capsys.readouterr().out
    assert out.count("Q: Where does the red ship sail?") == 3 and out.count("[2] ships.txt:") == 3
    assert prompt_for("Who?")[1] == ROLE_STOP and prompt_for("Who?", "chat") == ("Who?", (), True)
    with pytest.raises(ValueError, match="layout must be one of"):
        prompt_for("Who?", "poem")


def test_run_checks_questions_before_ingesting_and_forgets_files(make_tiny, tmp_path, capsys):
    """Outside-in review of `memlong ask`: a question longer than the window failed after the whole ingest (and
    after the earlier answers, whose --json was never written); a deleted file's chunks stayed for good."""
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    with pytest.raises(ValueError, match="QUESTION 2 is .* tokens .* local window of 64: shorten it, or raise "
                                         "--local-window"):
        run_ask(ml, {"a.txt": TEXT}, ["Short?", "word " * 80], namespace="n", max_new_tokens=2, progress=False)
    assert ml.bank.num_chunks("n") == 0  # nothing was ingested
    records = run_ask(ml, {str(tmp_path / "a.txt"): TEXT, str(tmp_path / "b.txt"): "The abbey bell rings. " * 9},
                      ["Which ship?"], namespace="n", max_new_tokens=2, progress=False)
    assert records[0]["memory_chunks"] == ml.bank.num_chunks("n") and held_files(ml, "n") == [
        str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert f"of 2 file(s) in namespace 'n': {tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}" in capsys.readouterr().out
    run_ask(ml, {}, ["Which ship?"], namespace="n", forget=[str(tmp_path / "a.txt")], max_new_tokens=2,
            progress=False)  # a.txt was never written to disk: forgotten by its path all the same
    assert held_files(ml, "n") == [str(tmp_path / "b.txt")] and "forgot" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--forget .*: no file .* it holds .*b\.txt"):
        run_ask(ml, {}, ["Which ship?"], namespace="n", forget=[str(tmp_path / "a.txt")], progress=False)


@pytest.mark.slow
def test_cli_ask_answers_from_a_disk_bank_kept_between_runs(tmp_path, capsys):
    """The command as a user runs it, on the default model: the answer must name the planted password; a second
    run answers from the committed bank without --file, a third with the unchanged file reads nothing again."""
    book, memory = tmp_path / "book.txt", tmp_path / "book.memory"
    book.write_text(plant_fact(shakespeare_text("macbeth")[:20_000], 0.5, GATE))  # (answered in ask_layouts.py)
    runs = []
    for argv in (["--file", str(book)], [], ["--file", str(book)]):
        out = tmp_path / f"run{len(runs)}.json"
        assert main(["ask", *argv, "--memory", str(memory), GATE.question, "--no-progress", "--json", str(out)]) == 0
        runs.append(json.loads(out.read_text()))
    printed = capsys.readouterr().out
    assert "committed the memory to" in printed and "already in memory" in printed
    first, second, third = (r[0] for r in runs)
    assert GATE.contains(first["answer"]), first["answer"]
    assert [s["file"] for s in first["sources"]] == [str(book)] * 4  # top_k 4, the CLI's ask default
    assert first["files"][0]["ingested"] and second["files"] == [] and not third["files"][0]["ingested"]
    assert first["answer"] == second["answer"] == third["answer"]  # the same memory, reopened
    assert first["memory_chunks"] == second["memory_chunks"] == third["memory_chunks"] > 20


@pytest.mark.slow
def test_ask_layouts_benchmark_tiny_run(tmp_path, capsys):
    import ask_layouts

    out = tmp_path / "layouts.json"
    assert ask_layouts.main(["--tiny", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["questions"] == 1 and [r["layout"] for r in saved["records"]] == list(LAYOUTS)
    assert saved["counts"] == {r["layout"]: int(r["right"]) for r in saved["records"]}
    assert all(r["right"] == ("saffron" in r["answer"].lower()) for r in saved["records"])
    assert "of 1 right" in capsys.readouterr().out
