"""GPU benchmarks (issue 7) on a random-weight OpenLLaMA-3B-shaped Llama; weights do not change speed or memory.

Shape: 26 layers, hidden 3,200, 32 heads (no GQA), MLP 8,640, bf16, the default model's tokenizer; the
retriever is a random-weight all-MiniLM-L6-v2 (same shape, so the same cost) on the GPU. MemLong runs the
paper's setting for this shape (``kv_source="memory_layer"``, memory layer 13, retrieval layers 13/17/21/25,
``position_layout="zero"``), chunks of 128, local window 1,024, top-k 8, K-V stored in fp16 on the CPU.

Measured, each MemLong figure beside its plain-transformers baseline on the same weights:

* ``ingest``: seconds and peak GPU memory to ingest 32k / 80k / 128k-token documents, against one plain
  full-attention prefill (SDPA, with the KV cache a decode would need) of the same tokens; an OOM is a result.
  Each row splits MemLong's time into decoder forward, embedder, bank writes and the rest (synchronised);
  ``--compare-backend flex`` adds a row with another attention backend for the shortest document.
  ``--stream-compile`` also ingests each document with ``MemLongConfig.stream_compile`` (``compiled_tok_s``,
  ``compiled_ratio_tok_s``; the first, warm-up document pays the compilation: ``compiled_warmup_s``).
* ``decode``: one decode step with memory after each ingest (MemLong ``generate``: window + top-k chunks)
  against plain full attention with a 4k and an 80k KV cache.
* ``ttft``: time to first token with ``N x C`` retrieved tokens as stored K-V (only the question encoded;
  ``per_layer`` K-V kept on the CPU, in pinned CPU memory and on the GPU, each with its fetch / context /
  forward split) against re-encoding the same text + question, for 8 x 512, 16 x 512 and 32 x 1,024.
* ``search``: retrieval latency, k=8, 384-d, 1k to 1M chunks: ``MemoryBank``'s faiss index (faiss-gpu when
  the installed faiss has GPUs, else faiss-cpu) and exact inner product with torch on the GPU.

The lent GPU machine has no package registry, so prepare what it lacks here and carry it::

    python benchmarks/gpu.py --prepare .gpucarry        # tokenizers, MiniLM's config, a faiss-cpu wheel (~23 MB)
    # on the device machine, with .gpucarry carried (it is git-ignored):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpucarry/*.whl && \\
      PYTHONPATH=/tmp/site:. python3 benchmarks/gpu.py --assets .gpucarry --json $OUT/gpu.json --plot $OUT/gpu.png

``--tiny`` runs every code path on a 2-layer model and short documents (a CPU smoke run; the test suite
runs it); its numbers mean nothing. ``--from-json FILE --plot PNG`` redraws the plot of a saved run.
Measured on an H100: README, "Benchmarks (GPU, H100)", and results/bench-gpu-h100*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from cpu import _Timers  # benchmarks/cpu.py: this script's folder is on sys.path when it runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

SHAPE_3B = dict(num_hidden_layers=26, hidden_size=3200, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=8640)
# head dim 100 like the 3B shape, so that a --tiny run on CUDA tries the same attention kernels first
SHAPE_TINY = dict(num_hidden_layers=2, hidden_size=200, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=256)
MINILM_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "1_Pooling")


# ------------------------------------------------------------------ assets
def prepare(out: Path) -> None:
    """Copy the tokenizers and MiniLM's config (no weights) to ``out`` and download a faiss-cpu wheel."""
    import faiss

    from memlong.default_model import default_model_path
    from memlong.embedder import default_embedder_path

    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in default_model_path().iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / "tokenizer" / f.name)
    (out / "minilm").mkdir(exist_ok=True)
    for name in MINILM_FILES:
        src = default_embedder_path() / name
        if src.is_dir():
            shutil.copytree(src, out / "minilm" / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, out / "minilm" / name)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(out),
                    f"faiss-cpu=={faiss.__version__}"], check=True)
    print(f"wrote {out}: carry it to the device machine (see this script's docstring)")


def _assets(assets: str | None) -> tuple[Path, Path]:
    """(tokenizer folder, MiniLM folder without weights): from ``assets`` or from the installed packages."""
    if assets:
        return Path(assets) / "tokenizer", Path(assets) / "minilm"
    from memlong.default_model import default_model_path
    from memlong.embedder import default_embedder_path

    return default_model_path(), default_embedder_path()


def random_embedder(minilm: Path, device: str):
    """A random-weight model of MiniLM's shape behind :class:`memlong.Embedder` (same cost, meaningless vectors)."""
    from transformers import BertConfig, BertModel

    from memlong import Embedder

    folder = Path(tempfile.mkdtemp(prefix="minilm-shape-"))
    for name in MINILM_FILES:
        src = minilm / name
        if src.is_dir():
            shutil.copytree(src, folder / name)
        elif src.exists():
            shutil.copy(src, folder / name)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(minilm)).save_pretrained(folder)
    return Embedder(str(folder), device=device)


def build(tiny: bool, device: str, assets: str | None):
    """The random-weight model (bf16 on CUDA, fp32 on CPU), its tokenizer and the embedder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_path, minilm = _assets(assets)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=262_144, attn_implementation="sdpa",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **(SHAPE_TINY if tiny else SHAPE_3B))
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), tokenizer, random_embedder(minilm, device)


def document(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """Text of about ``n_tokens`` tokens (random words of the vocabulary; a random model reads anything)."""
    rng = np.random.default_rng(seed)
    words = [w for w in tokenizer.convert_ids_to_tokens(range(len(tokenizer))) if w.startswith("Ġ") and w[1:].isalpha()]
    text = " ".join(w[1:] for w in rng.choice(words, size=n_tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


# ------------------------------------------------------------------ timing helpers
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


@contextlib.contextmanager
def _plain(model):
    """Run the HF model with plain SDPA attention inside the ``with`` block (MemLong registers its own)."""
    old, model.config._attn_implementation = model.config._attn_implementation, "sdpa"
    try:
        yield
    finally:
        model.config._attn_implementation = old


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def full_prefill(model, ids: list[int], device: str):
    """One plain full-attention prefill with a KV cache; returns (seconds, peak GiB, cache) or an OOM note."""
    _reset_peak(device)
    try:
        with torch.no_grad(), _plain(model):
            _sync(device)
            t0 = time.perf_counter()
            out = model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
            _sync(device)
        return time.perf_counter() - t0, _peak_gib(device), out
    except Exception as exc:  # noqa: BLE001 - an OOM is a measurement here
        if not _is_oom(exc):
            raise
        torch.cuda.empty_cache()
        return None, "OOM", None


def full_decode_step(model, out, device: str, steps: int) -> float:
    """Median seconds per greedy decode step on top of a prefill's KV cache."""
    cache, token = _cache(out), out.logits[:, -1:].argmax(-1)
    times = []
    with torch.no_grad(), _plain(model):
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - t0)
            cache = _cache(out)
    return float(np.median(times))


def _cache(out):
    """The KV cache of a forward's output (``past_key_values``, called ``cache`` in newer transformers)."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else out.cache


# ------------------------------------------------------------------ benchmarks
def bench_ingest_decode(ml, lengths: list[int], decode_at: int, decode_short: int, steps: int, device: str,
                        compare_backend: str | None = None, stream_compile: bool = False) -> list[dict]:
    # first-call costs (CUDA context, cuBLAS, FlexAttention's compile) out of the timings
    warm = document(ml.tokenizer, 4096, seed=7)
    ml.ingest(warm, namespace="warmup", progress=False)
    ml.reset()
    full_prefill(ml.model, ml.tokenize(warm), device)
    rows = []
    base = ml.config
    runs = [(n, base.attention_backend) for n in lengths]
    if compare_backend:
        runs.insert(1, (lengths[0], compare_backend))
    for n, backend in runs:
        text = document(ml.tokenizer, n, seed=n)
        ids = ml.tokenize(text)
        ml.config = dataclasses.replace(base, attention_backend=backend)
        if backend != base.attention_backend:  # warm this backend up too
            ml.ingest(warm, namespace="warmup", progress=False)
        ml.reset()
        _reset_peak(device)
        with _Timers(ml, sync=lambda: _sync(device)) as parts:  # where the time goes
            t0 = time.perf_counter()
            ml.ingest(text, namespace="doc", progress=False)
            _sync(device)
            seconds = time.perf_counter() - t0
        row = {"bench": "ingest", "backend": backend, "tokens": len(ids), "memlong_s": seconds,
               "memlong_tok_s": len(ids) / seconds, "memlong_peak_gib": _peak_gib(device),
               "memory_bank_gib": ml.bank.nbytes("doc") / 2**30,
               **{f"{name}_s": t for name, t in parts.seconds.items()},
               "other_s": seconds - sum(parts.seconds.values())}
        ml.config = base
        if backend != base.attention_backend:  # the backend comparison: no baseline or decode needed again
            ml.reset()
            rows.append(row)
            print(rows[-1], file=sys.stderr, flush=True)
            continue
        # decode with this document's memory (window + retrieved chunks): its cost must not grow with n
        rows += decode_modes(ml, steps, len(ids), _sync if device.startswith("cuda") else None, device)
        ml.reset()
        if stream_compile:  # the same document through the compiled step (CUDA graphs on CUDA), after a warm-up
            try:
                row.update(compiled_warmup_s=_ingest_compiled(ml, warm, "warmup", device),
                           compiled_s=_ingest_compiled(ml, text, "doc", device))
                row["compiled_tok_s"] = len(ids) / row["compiled_s"]
            except Exception as exc:  # a compiler failure is a result to report, not the end of the run
                row["compiled_error"] = f"{type(exc).__name__}: {exc}"[:500]
        full_s, peak, out = full_prefill(ml.model, ids, device)
        row.update(full_s=full_s, full_peak_gib=peak, ratio_tok_s=(full_s / seconds) if full_s else None)
        if stream_compile and full_s and "compiled_s" in row:
            row["compiled_ratio_tok_s"] = full_s / row["compiled_s"]
        rows.append(row)
        if n == decode_at and out is not None:
            rows.append({"bench": "decode", "system": "full attention", "history_tokens": len(ids),
                         "step_ms": 1e3 * full_decode_step(ml.model, out, device, steps)})
        del out
        print(rows[-1], file=sys.stderr, flush=True)
    ids = ml.tokenize(document(ml.tokenizer, decode_short, seed=1))
    _, _, out = full_prefill(ml.model, ids, device)
    if out is not None:
        rows.append({"bench": "decode", "system": "full attention", "history_tokens": len(ids),
                     "step_ms": 1e3 * full_decode_step(ml.model, out, device, steps)})
    return rows


def _ingest_compiled(ml, text: str, namespace: str, device: str) -> float:
    """Seconds to ingest ``text`` with ``stream_compile`` (the namespace is reset before and after)."""
    base = ml.config
    ml.config = dataclasses.replace(base, stream_compile=True)
    ml.reset(namespace)
    try:
        t0 = time.perf_counter()
        ml.ingest(text, namespace=namespace, progress=False)
        _sync(device)
        return time.perf_counter() - t0
    finally:
        ml.config = base
        ml.reset(namespace)


def decode_modes(ml, steps: int, history: int, sync, device: str) -> list[dict]:
    """One answer per ``MemLongConfig.decode_mode`` (each after a warm-up answer, which compiles ``compiled``): ms per
    decode step, and whether the tokens equal the dynamic path's."""
    rows, base, texts = [], ml.config, {}
    for mode in ("dynamic", "static", "compiled"):
        ml.config = dataclasses.replace(base, decode_mode=mode)
        try:
            for _ in range(2):
                g = ml.generate("Question: what happened next?\nAnswer:", namespace="doc",
                                max_new_tokens=steps + 1, stream=True)
                texts[mode] = g.text()
                if sync:
                    sync(device)
        except Exception as exc:  # a compiler failure is a result to report, not the end of the run
            rows.append({"bench": "decode", "system": "memlong", "decode_mode": mode, "history_tokens": history,
                         "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        finally:
            ml.config = base
        stats = g.stats
        per_step = (stats.seconds - stats.time_to_first_token) / max(stats.new_tokens - 1, 1)
        rows.append({"bench": "decode", "system": "memlong", "decode_mode": mode, "history_tokens": history,
                     "step_ms": 1e3 * per_step, "new_tokens": stats.new_tokens, "memory_tokens": stats.memory_tokens,
                     "same_tokens_as_dynamic": texts[mode] == texts["dynamic"]})
    return rows


def bench_ttft(model, tokenizer, embedder, points: list[tuple[int, int]], device: str, repeats: int,
               backend: str = "auto") -> list[dict]:
    """K-V injection with the bank's K-V on the CPU (``memory_device="cpu"``: retrieved chunks are copied to the
    GPU per query), in pinned CPU memory (CUDA only), the default ``"auto"`` (on CUDA: pinned memory below a GPU
    cache of recently read chunks, ``memlong.kv_cache``; timed warm, and cold with the cache cleared before every
    query) and on the GPU (``memory_device="model"``), against re-encoding the same text."""
    from memlong import MemLong, MemLongConfig

    rows = []
    question = "\nQuestion: what is the password of the harbour gate?\nAnswer:"
    for n, size in points:
        row: dict = {"bench": "ttft", "retrieved": f"{n} x {size}"}
        text_doc = document(tokenizer, n * size, seed=size)
        places = ("cpu", "pinned", "auto", "model") if device.startswith("cuda") else ("cpu", "auto", "model")
        for where in places:
            ml = MemLong(model, tokenizer, MemLongConfig(chunk_size=size, local_window=2 * size, top_k=n,
                                                         memory_capacity=2 * n * size, memory_device=where,
                                                         attention_backend=backend), embedder=embedder)
            stats = ml.ingest(text_doc, namespace="ttft", progress=False)
            chunk_ids = stats.chunk_ids[:n]
            kv = []
            ml.generate(question, namespace="ttft", chunk_ids=chunk_ids, max_new_tokens=1)  # warm-up
            split = [(ml, "memory_for", "fetch", None), (ml, "context", "context", None), (ml, "run", "forward", None)]
            with _Timers(ml, sync=lambda: _sync(device), parts=split) as parts:
                for _ in range(repeats):
                    ml.generate(question, namespace="ttft", chunk_ids=chunk_ids, max_new_tokens=1)
                    kv.append(ml.last_generation.time_to_first_token)
            tag = {"cpu": "kv_cpu", "pinned": "kv_pinned", "auto": "kv_auto", "model": "kv_gpu"}[where]
            row["kv_tokens_encoded"] = ml.last_generation.prompt_tokens
            row[f"{tag}_ttft_s"] = float(np.median(kv))
            if where == "auto":  # the cold cache: every chunk copied again (no cache on a CPU model: as warm)
                row["kv_auto_cache_bytes"] = ml.kv_cache.max_bytes if ml.kv_cache else 0
                cold = []
                for _ in range(repeats):
                    if ml.kv_cache:
                        ml.kv_cache.clear()
                    ml.generate(question, namespace="ttft", chunk_ids=chunk_ids, max_new_tokens=1)
                    cold.append(ml.last_generation.time_to_first_token)
                row["kv_auto_cold_ttft_s"] = float(np.median(cold))
            # where the time goes (means; the rest of the TTFT is tokenizing, sampling and Python)
            row.update({f"{tag}_{name}_s": t / repeats for name, t in parts.seconds.items()})
            context = "".join(ml.bank.get(c, namespace="ttft").text for c in chunk_ids)
            ml.reset()
            del ml
            _reset_peak(device)
        ids = tokenizer(context + question, add_special_tokens=False)["input_ids"]
        text = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), _plain(model):
                model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1).logits.argmax(-1)
            _sync(device)
            text.append(time.perf_counter() - t0)
        row.update(reencode_tokens_encoded=len(ids), reencode_ttft_s=float(np.median(text[1:])))
        row.update({f"ratio_{tag}": row["reencode_ttft_s"] / row[f"{tag}_ttft_s"]
                    for tag in ("kv_cpu", "kv_pinned", "kv_auto", "kv_auto_cold", "kv_gpu") if f"{tag}_ttft_s" in row})
        rows.append(row)
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def bench_search(sizes: list[int], device: str, queries: int = 100) -> list[dict]:
    import faiss

    rows = []
    rng = np.random.default_rng(0)
    on_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    for n in sizes:
        base = rng.standard_normal((n, 384), dtype=np.float32)
        faiss.normalize_L2(base)
        q = rng.standard_normal((queries, 384), dtype=np.float32)
        faiss.normalize_L2(q)
        index = faiss.IndexFlatIP(384)
        if on_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(base)
        t0 = time.perf_counter()
        for i in range(queries):
            index.search(q[i:i + 1], 8)
        row = {"bench": "search", "chunks": n, "faiss": "faiss-gpu" if on_gpu else "faiss-cpu",
               "faiss_ms": 1e3 * (time.perf_counter() - t0) / queries}
        if device.startswith("cuda"):
            tb, tq = torch.from_numpy(base).to(device, torch.float16), torch.from_numpy(q).to(device, torch.float16)
            (tb @ tq[0]).topk(8)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(queries):
                (tb @ tq[i]).topk(8).indices.cpu()
            row["torch_gpu_ms"] = 1e3 * (time.perf_counter() - t0) / queries
        rows.append(row)
    return rows


# ------------------------------------------------------------------ output
def table(rows: list[dict]) -> str:
    out = []
    for bench in dict.fromkeys(r["bench"] for r in rows):
        group = [r for r in rows if r["bench"] == bench]
        cols = list(dict.fromkeys(k for r in group for k in r if k != "bench"))
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))
        out += [f"{bench}:", "| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
        out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in group]
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ing = [r for r in rows if r["bench"] == "ingest" and "full_s" in r]  # not the backend comparison
    x = np.arange(len(ing))
    axes[0].bar(x - 0.2, [r["memlong_peak_gib"] or 0 for r in ing], 0.4, label="MemLong ingest", color="#2171b5")
    axes[0].bar(x + 0.2, [r["full_peak_gib"] if isinstance(r["full_peak_gib"], float) else 0 for r in ing], 0.4,
                label="full attention (0 = OOM)", color="#bbbbbb")
    axes[0].set_xticks(x, [f"{r['tokens'] // 1024}k" for r in ing])
    axes[0].set_ylabel("peak GPU memory (GiB)")
    axes[0].set_xlabel("document tokens")
    axes[0].legend()
    dec = sorted((r for r in rows if r["bench"] == "decode" and "step_ms" in r),
                 key=lambda r: (r["system"], r["history_tokens"]))
    # numeric positions: equal labels (older records carry no decode_mode) must not stack their bars on one another
    axes[1].bar(np.arange(len(dec)), [r["step_ms"] for r in dec],
                color=["#2171b5" if r["system"] == "memlong" else "#bbbbbb" for r in dec])
    axes[1].set_xticks(np.arange(len(dec)), [
        f"{r.get('decode_mode') or 'MemLong' if r['system'] == 'memlong' else 'full'}\n{r['history_tokens'] // 1024}k"
        for r in dec])
    axes[1].tick_params(axis="x", labelsize=8)
    axes[1].set_ylabel("ms per decode step")
    axes[1].set_xlabel("MemLong (blue; its decode mode) or full attention (grey), history tokens")
    tt = [r for r in rows if r["bench"] == "ttft"]
    x = np.arange(len(tt))
    bars = [("kv_gpu_ttft_s", "K-V injection, K-V on GPU", "#08519c"),
            ("kv_auto_ttft_s", "K-V injection, default (auto), warm", "#2171b5"),
            ("kv_auto_cold_ttft_s", "K-V injection, default (auto), cold", "#6baed6"),
            ("kv_pinned_ttft_s", "K-V injection, pinned CPU", "#4292c6"),
            ("kv_cpu_ttft_s", "K-V injection, CPU", "#9ecae1"), ("reencode_ttft_s", "re-encode", "#bbbbbb")]
    bars = [b for b in bars if tt and b[0] in tt[0]]
    width = 0.8 / max(len(bars), 1)
    for i, (key, label, color) in enumerate(bars):
        axes[2].bar(x + (i - (len(bars) - 1) / 2) * width, [r[key] for r in tt], width, label=label, color=color)
    axes[2].set_yscale("log")
    axes[2].set_xticks(x, [r["retrieved"] for r in tt])
    axes[2].set_xlabel("retrieved chunks x tokens")
    axes[2].set_ylabel("time to first token (s)")
    axes[2].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", help="write the assets the device machine lacks to DIR and exit")
    p.add_argument("--assets", metavar="DIR", help="assets written by --prepare (default: the installed packages)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="2-layer model, short documents: a smoke run of every path")
    p.add_argument("--benches", default="ttft,search,ingest", help="comma-separated subset, run in this order")
    p.add_argument("--lengths", default=None, help="document tokens for ingest (default 32768,81920,131072)")
    p.add_argument("--attention-backend", default="auto", help="auto: sdpa; flex measured slower on an H100")
    p.add_argument("--stream-compile", action="store_true",
                   help="also time each ingest with MemLongConfig.stream_compile (CUDA graphs on CUDA)")
    p.add_argument("--compare-backend", default=None,
                   help="also time the shortest ingest with this backend (e.g. sdpa), for comparison")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--from-json", metavar="JSON", help="only draw --plot from a saved --json (no GPU needed)")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        plot(saved["records"], args.plot or str(Path(args.from_json).with_suffix(".png")),
             f"MemLong vs full attention, OpenLLaMA-3B shape, {saved['machine']['device']}")
        return 0
    if args.prepare:
        prepare(Path(args.prepare))
        return 0
    from memlong import MemLong, MemLongConfig

    lengths = [int(x) for x in (args.lengths or ("2048,4096" if args.tiny else "32768,81920,131072")).split(",")]
    decode_at = 4096 if args.tiny else 81_920
    decode_short = 1024 if args.tiny else 4096
    ttft_points = [(2, 64), (4, 64)] if args.tiny else [(8, 512), (16, 512), (32, 1024)]
    sizes = [1000, 10_000] if args.tiny else [1000, 10_000, 100_000, 1_000_000]
    benches = list(dict.fromkeys(args.benches.split(",")))
    unknown = set(benches) - {"ingest", "ttft", "search"}
    if unknown:
        p.error(f"unknown benches {sorted(unknown)}; choose from ingest, ttft, search")
    t_start = time.perf_counter()
    model, tokenizer, embedder = build(args.tiny, args.device, args.assets)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows: list[dict] = []

    def save() -> None:  # after every bench, so that a run cut short still leaves its results
        meta = {"device": device_name, "torch": torch.__version__, "shape": SHAPE_TINY if args.tiny else SHAPE_3B,
                "dtype": "bfloat16" if args.device.startswith("cuda") else "float32", "tiny": args.tiny,
                "attention_backend": args.attention_backend, "seconds": time.perf_counter() - t_start,
                "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": meta, "records": rows}, indent=1))

    for bench in benches:  # in the order asked: a run cut short keeps what came first
        if bench == "ingest":
            config = MemLongConfig(kv_source="memory_layer", position_layout="zero", top_k=8,
                                   memory_capacity=max(lengths) + 4096, attention_backend=args.attention_backend)
            ml = MemLong(model, tokenizer, config, embedder=embedder)
            rows += bench_ingest_decode(ml, lengths, decode_at if decode_at in lengths else lengths[-1], decode_short,
                                        args.decode_steps, args.device, args.compare_backend, args.stream_compile)
            ml.reset()
            del ml
        elif bench == "ttft":
            rows += bench_ttft(model, tokenizer, embedder, ttft_points, args.device, args.repeats, args.attention_backend)
        elif bench == "search":
            rows += bench_search(sizes, args.device)
        save()
    print(table(rows))
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"MemLong vs full attention, {'tiny' if args.tiny else 'OpenLLaMA-3B shape'}, {device_name}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
