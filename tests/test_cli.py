"""The command line validates every input before work starts (issue 16, defect 13): one-line errors naming the
fix, exit code 2, no traceback, no model loaded; flags come from MemLongConfig (issue 17); a bounded fuzz."""

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlong import MemLongConfig
from memlong.cli import CLI_DEFAULTS, CONFIG_FLAGS, build_parser, main
from memlong.cli_args import config_field_help


class ModelLoaded(BaseException):  # noqa: N818 - BaseException so that main() cannot swallow it
    """Raised if a command got past validation to loading a model."""


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if any command loads a model (validation must come first)."""
    from memlong.model import MemLong

    def refuse(*args, **kwargs):
        raise ModelLoaded(f"a model was loaded with {args} {kwargs}")

    monkeypatch.setattr(MemLong, "from_pretrained", classmethod(refuse))


def run(argv, capsys):
    """(exit code, stderr) of ``memlong argv`` in-process."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["eval", "ppl", "--file", "MISSING"], ["--file", "missing"]),
    (["eval", "ppl", "--file", "DIR"], ["--file", "directory"]),
    (["eval", "passkey", "--filler", "MISSING"], ["--filler", "missing"]),
    (["eval", "passkey", "--filler", "DIR"], ["--filler", "directory"]),
    (["eval", "passkey", "--filler", "EMPTY"], ["--filler", "empty"]),
    (["eval", "ppl", "--model", "MISSING/x"], ["--model"]),
    (["eval", "ppl", "--model", "EMPTY"], ["--model", "not a model folder"]),
    (["eval", "ppl", "--json", "DIR"], ["--json", "directory"]),
    (["eval", "ppl", "--json", "EMPTY/out.json"], ["--json", "is not a folder"]),
    (["eval", "ppl", "--score-last", "0"], ["--score-last", "minimum 1"]),
    (["eval", "ppl", "--score-last", "-5"], ["--score-last", "minimum 1"]),
    (["eval", "passkey", "--trials", "0"], ["--trials"]),
    (["eval", "passkey", "--trials", "-3"], ["--trials"]),
    (["eval", "passkey", "--lengths=-100,0"], ["--lengths", "-100"]),
    (["eval", "passkey", "--lengths", "4096,"], ["--lengths"]),
    (["train", "--output", "EMPTY"], ["--output", "is a file"]),
    (["train-reader", "--output", "EMPTY"], ["--output", "is a file"]),
    (["train-reader", "--output", "MISSING", "--adapter", "shakespeare"], ["--adapter", "base model"]),
    (["demo", "--load-memory", "MISSING"], ["--load-memory"]),
    (["demo", "--save-memory", "DIR"], ["--save-memory", "other files"]),  # was found after the whole ingest
    (["demo", "--save-memory", "DISK"], ["--save-memory", "a disk bank", "lives there"]),  # was replaced, at the end
    (["eval", "ppl", "--modes", "window,everything"], ["--modes"]),
    (["eval", "icl", "--data", "MISSING"], ["does not exist"]),  # said "has extension '(none)'"
    (["eval", "ppl", "--file", "EMPTY"], ["--file", "empty"]),  # was refused after the model loaded
    (["demo", "--retrieve-next", "10"], ["--retrieve-next", "maximum 4"]),  # likewise
    (["ask", "Who?"], ["nothing to answer from", "--file"]),
    (["ask", "--memory", "MISSING", "Who?"], ["nothing to answer from", "--memory"]),
    (["ask", "--file", "MISSING", "Who?"], ["--file", "missing"]),
    (["ask", "--file", "EMPTY", "Who?"], ["--file", "empty"]),
    (["ask", "--file", "DISK/manifest.json", " "], ["QUESTION is blank"]),
    (["ask", "--memory", "EMPTY", "Who?"], ["--memory", "is a file"]),
    (["ask", "--memory", "DIR", "Who?"], ["--memory", "other files"]),
    (["ask", "--memory", "SAVED", "Who?"], ["--memory", "saved with save_memory", "not a disk bank"]),
    (["ask", "--file", "DISK/manifest.json", "--layout", "poem", "Who?"], ["--layout", "invalid choice"]),
    (["ask", "--file", "DISK/manifest.json", "--top-k", "0", "Who?"], ["--top-k 0 reads no memory"]),
    (["ask", "--file", "DISK/manifest.json", "--forget", "x.txt", "Who?"], ["--forget", "give --memory DIR"]),
])
def test_bad_inputs_fail_in_one_line_before_any_model_loads(argv, needles, tmp_path, capsys, no_model):
    (tmp_path / "empty.txt").write_text("   \n")
    paths = {"MISSING": str(tmp_path / "missing"), "DIR": str(tmp_path), "EMPTY": str(tmp_path / "empty.txt"),
             "DISK": str(tmp_path / "disk"), "SAVED": str(tmp_path / "saved")}
    if "SAVED" in argv:
        from test_persistence import HashEmbedder, fill

        from memlong import MemoryBank
        fill(bank := MemoryBank(embedder=HashEmbedder()), "ns", 2)
        bank.save(tmp_path / "saved")
    if any(a.startswith("DISK") for a in argv):
        from test_persistence import HashEmbedder, fill

        from memlong import MemoryBank
        fill(bank := MemoryBank(embedder=HashEmbedder(), path=tmp_path / "disk"), "ns", 2)
        bank.commit()
    argv = [next((a.replace(k, v) for k, v in paths.items() if a.startswith(k)), a) for a in argv]
    assert_one_line_error(*run(argv, capsys), *needles)


@pytest.mark.parametrize("command, checkpoint, resume", [
    (["train"], True, True), (["train"], False, False), (["train", "--no-resume"], True, False),
    (["eval", "ppl"], False, False)])
def test_ctrl_c_ends_with_one_line_and_exit_code_130(command, checkpoint, resume, tmp_path, capsys, monkeypatch):
    """One line, no traceback; 'rerun to resume' only where a rerun resumes (a checkpoint, no --no-resume)."""
    from memlong.checkpoint import CHECKPOINT_NAME
    from memlong.model import MemLong

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MemLong, "from_pretrained", classmethod(interrupted))
    if checkpoint:  # as a run interrupted after its first steps leaves it
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / CHECKPOINT_NAME).write_text("{}")
    code, err = run([*command, *(["--output", str(tmp_path / "run")] if command[0] == "train" else [])], capsys)
    assert code == 130 and err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert "interrupted" in err and ("rerun the same command to resume" in err) == resume


def test_an_unwritable_json_is_found_before_the_run(tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert_one_line_error(*run(["eval", "ppl", "--json", str(locked / "out.json")], capsys), "--json")
    finally:
        locked.chmod(0o700)


def test_an_empty_filler_is_refused_not_looped_on(make_tiny):
    from memlong.evaluation import passkey

    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    for bad in (dict(filler=""), dict(lengths=[0]), dict(lengths=[-100]), dict(trials=0), dict(lengths=[128, 10])):
        kwargs = dict(lengths=[128], trials=1, filler="some filler text", progress=False) | bad
        with pytest.raises(ValueError, match="filler|lengths|trials|passkey length 10 leaves no room"):
            passkey(ml, **kwargs)


def test_help_is_plain_text_and_describes_every_option():
    """Review finding: --help printed reST (``memlong``, :mod:`memlong.static_kv`), options without a word of help,
    an --adapter help without the packaged adapter, and offered --ingest-top-k None, which was refused."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    screens = [parser.format_help()] + [c.format_help() for c in commands.values()]
    screens += [c.format_help() for c in commands["eval"]._subparsers._group_actions[0].choices.values()]
    for screen in screens:
        assert "``" not in screen and ":mod:" not in screen and ":meth:" not in screen and ":func:" not in screen
    for command in [*commands.values(), *commands["eval"]._subparsers._group_actions[0].choices.values()]:
        for action in command._actions:
            if action.option_strings and action.dest != "help" and command.prog != "memlong eval":
                assert action.help, (command.prog, action.option_strings)
    assert "packaged adapter (shakespeare)" in " ".join(commands["demo"].format_help().split())
    assert parser.parse_args(["eval", "ppl", "--ingest-top-k", "None"]).ingest_top_k is None


def test_help_and_flag_errors_answer_without_importing_torch_or_faiss():
    """`memlong --help` took 3 s on this CPU (memlong/__init__ imported the model, so torch and faiss, first)."""
    import subprocess
    import sys

    script = ("import sys\nfrom memlong import cli\n"
              "for argv in (['--help'], ['demo', '--help'], ['eval', 'ppl', '--top-k', 'x']):\n"
              "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
              "print(sorted(m for m in ('torch', 'faiss', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout[-300:] + out.stderr[-300:]
    assert out.stdout.count("exit 0") == 2 and "exit 2" in out.stdout and "--top-k" in out.stderr


def test_every_public_name_imports_from_the_package():
    import memlong

    namespace: dict = {}
    exec("from memlong import *", namespace)
    assert set(memlong.__all__) <= set(namespace) and set(memlong.__all__) <= set(dir(memlong))
    assert namespace["MemLong"] is __import__("memlong.model").model.MemLong
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        memlong.Nope  # noqa: B018
    import subprocess
    import sys

    # submodules as attributes of the package, as when it imported them all (diff review: AttributeError)
    script = "import memlong\nprint(memlong.memory.MemoryBank.__name__, memlong.records.__name__, memlong.search.RRF_K)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout.split() \
        == ["MemoryBank", "memlong.records", "60"]


def test_docs_cli_md_names_every_option_of_every_command():
    """Review finding: docs/cli.md left out --device, --search-mode, demo's --max-new-tokens, eval icl's --field,
    train's --epochs, --held-out-docs and --no-resume; a new option must be documented where users look."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    parser = build_parser()
    commands = dict(parser._subparsers._group_actions[0].choices)
    commands.update(commands.pop("eval")._subparsers._group_actions[0].choices)
    missing = [(name, option) for name, command in commands.items() for action in command._actions
               for option in action.option_strings
               if option.startswith("--") and option != "--help" and not re.search(re.escape(option) + r"(?![\w-])", text)]
    assert missing == []


def test_config_flags_come_from_memlong_config():
    parser = build_parser()
    fields = {f.name: f for f in dataclasses.fields(MemLongConfig)}
    args = parser.parse_args(["eval", "ppl"])
    from memlong.cli import _config

    # unset flags: the library's defaults, except the CLI's one declared departure (CLI_DEFAULTS)
    assert _config(args) == CLI_DEFAULTS == {"memory_capacity": 65536}
    assert _config(parser.parse_args(["eval", "ppl", "--memory-capacity", "100", "--search-mode", "hybrid"])) == \
        {"memory_capacity": 100, "search_mode": "hybrid"}
    help_text = " ".join(parser._subparsers._group_actions[0].choices["demo"].format_help().split())
    described = config_field_help()  # (Python 3.13 dedents docstrings: its help lost every description)
    for name in CONFIG_FLAGS:
        assert "--" + name.replace("_", "-") in help_text
        assert len(described[name]) > 15 and " ".join(described[name].split()[:4]) in help_text
        if fields[name].default is not None:
            assert f"MemLongConfig default {fields[name].default}" in help_text  # read from the dataclass
    # a command's default of kv_reencode_head is dropped where the model cannot re-encode chunk starts; one given on the
    # command line is kept (MemLongConfig then says what it needs) and 0 turns the demo's default off
    assert _config(parser.parse_args(["demo"]))["kv_reencode_head"] == 32
    assert _config(parser.parse_args(["demo", "--kv-reencode-head", "0"]))["kv_reencode_head"] == 0
    assert "kv_reencode_head" not in _config(parser.parse_args(["demo", "--kv-source", "memory_layer"]))
    assert _config(parser.parse_args(["demo", "--kv-source", "memory_layer", "--kv-reencode-head", "8"]))[
        "kv_reencode_head"] == 8
    assert _config(parser.parse_args(["train-reader", "--output", "o", "--kv-refresh", "0.25"]))["kv_refresh"] == 0.25
    # both capacity defaults are stated, from their one source each (issue 17: they had drifted silently)
    assert f"MemLongConfig default {MemLongConfig().memory_capacity}; the CLI uses 65536" in help_text


# ------------------------------------------------------------------ fuzz: every command, bounded
COMMANDS = {"demo": ["demo"], "passkey": ["eval", "passkey"], "ppl": ["eval", "ppl"], "icl": ["eval", "icl"],
            "train": ["train", "--output", "OUT"], "train-reader": ["train-reader", "--output", "OUT"],
            "ask": ["ask", "--file", "BOOK", "Who?"]}
ZERO_OK = {"--top-k", "--ingest-top-k", "--shots", "--memory-demos", "--memory-k", "--eval-tokens", "--held-out-docs",
           "--warmup-steps", "--retrieve-next", "--kv-reencode-head"}
INT_FLAGS = ["--top-k", "--retrieve-next", "--ingest-top-k", "--local-window", "--memory-capacity", "--kv-reencode-head"]
PER_COMMAND_INTS = {"demo": ["--max-new-tokens"], "ask": ["--max-new-tokens"], "passkey": ["--trials"],
                    "ppl": ["--score-last"],
                    "icl": ["--n-test", "--shots", "--memory-demos", "--memory-k"],
                    "train": ["--lora-rank", "--grad-accum", "--max-steps", "--epochs", "--save-every",
                              "--eval-tokens", "--held-out-docs", "--warmup-steps", "--max-document-tokens"],
                    "train-reader": ["--lora-rank", "--steps"]}
PATH_FLAGS = {"demo": ["--load-memory", "--json", "--adapter", "--model"],
              "passkey": ["--filler", "--json", "--adapter"], "ppl": ["--file", "--json", "--model"],
              "icl": ["--json", "--adapter", "--data"], "train": ["--data", "--eval-data", "--json", "--model"],
              "train-reader": ["--json", "--model", "--adapter"],
              "ask": ["--file", "--memory", "--json", "--model", "--adapter"]}  # (--forget: a path deleted since is fine)
BAD_PATHS = {  # per flag: values that flag must refuse
    "--load-memory": ["MISSING", "EMPTY", "/dev/null"], "--adapter": ["MISSING", "EMPTY", "/dev/null"],
    "--model": ["EMPTY", "/dev/null", "MISSING/child"], "--filler": ["MISSING", "DIR", "EMPTY", "/dev/null", "/"],
    "--file": ["MISSING", "DIR", "/dev/null", "/"], "--json": ["DIR", "/", "EMPTY/child", "EMPTY/a/b"],
    "--data": ["MISSING", "MISSING/child"], "--eval-data": ["MISSING", "MISSING/child"],
    "--memory": ["EMPTY", "/dev/null", "DIR", "EMPTY/child"]}
BAD_INTS = st.one_of(st.sampled_from(["0", "-1", "-100", "1.5", "", "x", "1e3", "--", "0x10", "٣"]),
                     st.integers(max_value=-1).map(str), st.text(max_size=8).filter(lambda t: not _is_int(t)))


def _is_int(text):
    try:
        int(text)
    except ValueError:
        return False
    return True
BAD_OTHER = st.sampled_from([["--modes", "bogus"], ["--modes", ""], ["--device", "toaster"], ["--play", "nothing"],
                             ["--kv-source", "both"], ["--search-mode", "psychic"], ["--retrieval-layers", "1,x"],
                             ["--position-layout", "zero,continual"], ["--bogus-flag"], ["--seeds", "a,b"],
                             ["--lengths", "5,,6"], ["--method", "qlora"], ["--lr", "-1"], ["--max-minutes", "nan"],
                             ["--kv-refresh", "1.5"], ["--kv-refresh", "-0.1"], ["--kv-refresh", "x"],
                             ["--kv-reencode-head", "33"], ["--memory-device", "gpu"]])
GOOD = st.lists(st.sampled_from([["--no-progress"], ["--top-k", "2"], ["--seed", "3"], ["--local-window", "512"],
                                 ["--memory-capacity", "4096"]]), max_size=3)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data(), good=GOOD)
def test_fuzz_every_command_fails_cleanly_on_bad_input(command, data, good, tmp_path, capsys, no_model):
    """Any command with one bad argument among good ones: exit 2, one line, no traceback, no model loaded.
    (Flags a command does not have are bad arguments too.)"""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "book.txt").write_text("The abbey bell rings at noon.")
    paths = {"MISSING": str(tmp_path / "missing"), "DIR": str(tmp_path), "EMPTY": str(tmp_path / "empty.txt"),
             "OUT": str(tmp_path / "out"), "BOOK": str(tmp_path / "book.txt")}

    def sub(value):
        head, slash, rest = value.partition("/")
        return paths[head] + slash + rest if head in paths else value

    kind = data.draw(st.sampled_from(["int", "path", "other"]))
    if kind == "int":
        bad = [data.draw(st.sampled_from(INT_FLAGS + PER_COMMAND_INTS[command])), data.draw(BAD_INTS)]
        if bad[0] in ZERO_OK and bad[1].strip() in ("0", "-0", "+0"):
            bad[1] = "-1"  # 0 is a valid value of these flags
    elif kind == "path":
        flag = data.draw(st.sampled_from(PATH_FLAGS[command]))
        bad = [flag, sub(data.draw(st.sampled_from(BAD_PATHS[flag])))]
    else:
        bad = data.draw(BAD_OTHER)
    argv = [*map(sub, COMMANDS[command]), *(a for g in good for a in g), "=".join(bad)]
    assert_one_line_error(*run(argv, capsys))


def test_a_repeated_mode_runs_once():
    """Outside-in fuzz: `eval passkey --trials 1 --modes memlong,memlong` printed one memlong row of 2 trials."""
    from memlong.cli_args import modes_list

    assert modes_list("memlong,window,memlong") == ("memlong", "window")


def test_a_tilde_in_any_path_is_the_home_folder(tmp_path, capsys, monkeypatch, no_model):
    """CLI review: '~' (quoted, or in --json=~/x) was expanded by the checks but not by the writes: a run's results
    failed to save at the end, and --save-memory / train --output wrote into a folder literally named '~'."""
    from memlong import cli_args

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "book.txt").write_text("Some text to read.")
    args = cli_args.expand_user(build_parser().parse_args(
        ["demo", "--save-memory", "~/mem", "--json", "~/out.json", "--adapter", "shakespeare"]))
    assert (args.save_memory, args.json, args.adapter) == (str(tmp_path / "mem"), str(tmp_path / "out.json"),
                                                           "shakespeare")
    args = cli_args.expand_user(build_parser().parse_args(["train", "--output", "~/run", "--data", "~/a", "b"]))
    assert args.output == str(tmp_path / "run") and args.data == [str(tmp_path / "a"), "b"]
    with pytest.raises(ModelLoaded):  # the checks passed on the expanded paths; the run would start
        main(["eval", "ppl", "--file", "~/book.txt", "--json", "~/out.json"])


def test_a_closed_pipe_ends_quietly_with_sigpipes_status(tmp_path):
    """CLI review: `memlong demo | head -1` said 'memlong: error: [Errno 32] Broken pipe' with exit 2 (bad input)."""
    import subprocess
    import sys

    script = ("import sys\nfrom memlong import cli\nfrom memlong.model import MemLong\n"
              "def talk(*a, **k):\n    while True:\n        print('a line of output ' * 8)\n"
              "MemLong.from_pretrained = classmethod(talk)\nsys.exit(cli.main(['eval', 'ppl']))\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=tmp_path)
    assert child.stdout.readline().startswith(b"a line")
    child.stdout.close()  # the reader goes away, as head does
    assert child.wait(timeout=300) == 141
    assert child.stderr.read().decode().strip() == ""


def test_full_attention_beyond_the_models_positions_alone_is_an_error(make_tiny):
    """CLI review: `eval passkey --modes full` at a length past the model's positions skipped every trial, and the
    table of no records crashed with a TypeError traceback (exit 1, no JSON)."""
    from memlong.evaluation import passkey

    ml, _ = make_tiny(local_window=256)
    length = ml.max_positions + 64
    with pytest.raises(ValueError, match=f"Full attention cannot read a passkey prompt of {length} tokens plus the "
                                         f"question and answer: this model has {ml.max_positions} positions"):
        passkey(ml, lengths=[length], trials=1, modes=("full",), progress=False)
    assert [r["mode"] for r in passkey(ml, lengths=[length], trials=1, modes=("full", "window"), progress=False)] \
        == ["window"]
    assert passkey(ml, lengths=[length], trials=1, modes=(), progress=False) == []  # as before


def test_no_progress_hides_the_bars_of_transformers_too(tmp_path, monkeypatch, no_model):
    """CLI review: with --no-progress, loading the model still drew transformers' 'Loading weights' bars."""
    import transformers

    from memlong.model import MemLong

    seen = []

    def load(*args, **kwargs):
        seen.append(transformers.utils.logging.is_progress_bar_enabled())
        raise ModelLoaded("loaded")

    monkeypatch.setattr(MemLong, "from_pretrained", classmethod(load))
    transformers.utils.logging.enable_progress_bar()
    (tmp_path / "book.txt").write_text("Some text to read.")
    try:
        for flags in ([], ["--no-progress"]):
            with pytest.raises(ModelLoaded):
                main(["eval", "ppl", "--file", str(tmp_path / "book.txt"), *flags])
        assert seen == [True, False]  # off while the model loads
        assert transformers.utils.logging.is_progress_bar_enabled()  # and on again after the run (in-process callers)
    finally:
        transformers.utils.logging.enable_progress_bar()


def test_json_into_a_folder_that_does_not_exist_yet(tmp_path, no_model):
    """Wheel review: the documented `--json results/x.json` failed anywhere but a checkout (which has results/)."""
    from memlong.cli import _write_json

    (tmp_path / "book.txt").write_text("Some text to read.")
    out = tmp_path / "results" / "sub" / "ppl.json"
    with pytest.raises(ModelLoaded):  # the checks pass; the run would start
        main(["eval", "ppl", "--file", str(tmp_path / "book.txt"), "--json", str(out)])
    _write_json(str(out), [{"ppl": 1.0}])
    assert out.read_text().startswith("[")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a dangling link: refused up front, not after the run
    assert main(["eval", "ppl", "--file", str(tmp_path / "book.txt"), "--json", str(tmp_path / "gone" / "x.json")]) == 2


def test_a_repeated_seed_or_length_runs_once_and_the_library_refuses_it(make_tiny):
    """Evaluation review: --seeds 0,0 ran seed 0 twice and the summary pooled both (n 40 for 20 sentences, a Wilson
    interval as if twice the evidence); --lengths 4096,4096 printed duplicate rows."""
    from memlong.evaluation import passkey
    from memlong.icl import icl_eval

    args = build_parser().parse_args(["eval", "icl", "--seeds", "0,0,1,0"])
    assert args.seeds == [0, 1]
    assert build_parser().parse_args(["eval", "passkey", "--lengths", "4096,4096"]).lengths == [4096]
    ml, _ = make_tiny()
    with pytest.raises(ValueError, match="repeat a seed"):
        icl_eval(ml, task="sentiment", seeds=[0, 0])
    with pytest.raises(ValueError, match="repeat a length"):
        passkey(ml, lengths=[4096, 4096])


def test_an_unknown_flag_points_to_its_commands_help_and_train_does_not_offer_adapter(capsys, no_model):
    """Review findings: ``memlong demo --bogus`` said "(see memlong --help)", which does not list demo's options;
    ``memlong train --help`` offered ``--adapter``, which train and train-reader always refuse."""
    for argv, command in ((["demo", "--bogus"], "memlong demo"),
                          (["eval", "passkey", "--bogus", "1"], "memlong eval passkey"),
                          (["train-reader", "--output", "x", "--bogus"], "memlong train-reader")):
        assert_one_line_error(*run(argv, capsys), f"{command}: error: unrecognized arguments: --bogus",
                              f"(see {command} --help)")
    for command in ("train", "train-reader"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--adapter PATH" not in capsys.readouterr().out
        assert_one_line_error(*run([command, "--output", "x", "--adapter", "shakespeare"], capsys), "drop --adapter")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--adapter PATH" in capsys.readouterr().out


def test_json_dash_writes_the_records_to_stdout_and_the_table_to_stderr(tmp_path, capsys, monkeypatch, make_tiny):
    """Determinism review: ``--json -`` wrote a file named ``-``; ``memlong eval ... --json - | jq`` is the usual way to
    pipe records. Now the records are standard output's only content."""
    from memlong.model import MemLong

    ml, _ = make_tiny(local_window=64, chunk_size=16)
    monkeypatch.setattr(MemLong, "from_pretrained", classmethod(lambda cls, *args, **kwargs: ml))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text(" ".join(f"Line {i} of the book." for i in range(60)))
    assert main(["eval", "ppl", "--file", "book.txt", "--modes", "window,memlong", "--score-last", "32",
                 "--no-progress", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["mode"] for r in records] == ["window", "memlong"] and all(r["ppl"] > 1 for r in records)
    assert "| mode" in err and "| window" in err and not (tmp_path / "-").exists()
    assert main(["eval", "ppl", "--file", "book.txt", "--modes", "window", "--score-last", "32", "--no-progress"]) == 0
    assert "| window" in capsys.readouterr().out  # without it, the table stays on standard output
