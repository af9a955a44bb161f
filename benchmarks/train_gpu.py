"""The paper's trained mode on a GPU (issue 21): train the default model per mode, then compare them.

Modes (each a fresh default model, trained by :func:`memlong.train.train` on the shakespeare split with the same
data, LoRA and time budget, checkpointed in ``--runs/<mode>`` so that a rerun resumes it):

* ``memory_layer``: the paper (``kv_source="memory_layer"``, ``position_layout="zero"``);
* ``per_layer``: the library's training-free reading (``per_layer``, ``continual``), trained the same way;
* ``window``: the control: no memory at all (``top_k=0``), trained the same way, so that what memory adds is
  told apart from what fine-tuning on plays adds;
* ``untrained``: the training-free default, not trained (the baseline).

Per mode: held-out perplexity (Hamlet, Macbeth, The Tempest, their first ``--eval-tokens`` tokens), passkey at
``--passkey-length`` (``memlong`` reading, ``window`` for the control; with per-trial diagnostics), loss
curve, steps, tokens/s and peak memory. One JSON file, a table, and a plot of the loss curves.

The lent GPU machine has no package registry and takes at most 64 MiB per call, and the default model's GGUF
file alone is 98 MB. So the packages it needs are carried in three parts, one per call, each unpacked into
``.gpusite`` (git-ignored; it stays on the warm machine between calls): the GGUF file split in two (checked by
sha256 when joined) with the ``gguf`` reader (pure Python) and the ``shakespeare`` texts; then MiniLM with its
weights in float16 (45 MB instead of 91 MB)::

    python benchmarks/train_gpu.py --prepare .gpucarry-1,.gpucarry-2,.gpucarry-3     # here, once
    # on the device machine, three calls in a row (carry one folder each; the machine stays warm 30 s):
    python3 benchmarks/train_gpu.py --unpack .gpucarry-1
    python3 benchmarks/train_gpu.py --unpack .gpucarry-2
    python3 benchmarks/train_gpu.py --unpack .gpucarry-3 && PYTHONPATH=.gpusite:. python3 benchmarks/train_gpu.py \\
        --minutes 2 --json $OUT/train-gpu.json --plot $OUT/train-gpu.png

    python benchmarks/train_gpu.py --device cpu --steps 2 --eval-tokens 1536 --passkey-length 2048 \\
        --passkey-trials 1 --modes per_layer,untrained        # CPU smoke run (the test suite runs one)
    python benchmarks/train_gpu.py --random-3b --steps 300    # throughput and memory of the 3B shape, random weights

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = {
    "memory_layer": dict(kv_source="memory_layer", position_layout="zero"),
    "per_layer": dict(kv_source="per_layer", position_layout="continual"),
    "window": dict(top_k=0),
    "untrained": {},
}
PART_BYTES = 55 << 20  # the GGUF file's first part; both parts stay under the 64 MiB a call carries
SITE = ".gpusite"


# ------------------------------------------------------------------ carrying the packages
def _package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--prepare needs the installed package {name!r} (pip install -e .[dev] installs it).")
    return Path(list(spec.submodule_search_locations)[0])


def prepare(folders: list[Path]) -> None:
    """Write the three carry parts (see the module docstring) to ``folders``."""
    from safetensors.torch import load_file, save_file

    from memlong.default_model import GGUF_FILE, GGUF_PACKAGE
    from memlong.embedder import default_embedder_path

    if len(folders) != 3:
        raise SystemExit("--prepare takes three comma-separated folders, one per device call.")
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir(parents=True)
    model = _package(GGUF_PACKAGE)
    gguf = model / GGUF_FILE
    data = gguf.read_bytes()
    shutil.copytree(model, folders[0] / GGUF_PACKAGE, ignore=shutil.ignore_patterns(GGUF_FILE, "__pycache__"))
    (folders[0] / f"{GGUF_FILE}.part1").write_bytes(data[:PART_BYTES])
    (folders[1] / f"{GGUF_FILE}.part2").write_bytes(data[PART_BYTES:])
    shutil.copytree(_package("gguf"), folders[1] / "gguf", ignore=shutil.ignore_patterns("__pycache__"))
    embedder = default_embedder_path().parent
    target = folders[2] / embedder.name
    shutil.copytree(embedder, target, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "*.onnx",
                                                                     "__pycache__"))
    weights = embedder / "model" / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, target / "model" / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copytree(_package("shksprdata"), folders[1] / "shksprdata", ignore=shutil.ignore_patterns("__pycache__"))
    manifest = {"gguf": GGUF_FILE, "package": GGUF_PACKAGE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for f in folders:
        (f / "carry.json").write_text(json.dumps({**manifest, "part": folders.index(f) + 1}))
    sizes = ", ".join(f"{f}: {sum(p.stat().st_size for p in f.rglob('*') if p.is_file()) / 2**20:.1f} MiB"
                      for f in folders)
    print(f"wrote {sizes}; carry one folder per device call (see the docstring)")


def unpack(folder: Path, site: Path) -> None:
    """Install one carried part into ``site``; the GGUF file is joined, and checked, once both parts are there."""
    manifest = json.loads((folder / "carry.json").read_text())
    site.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.is_dir():
            shutil.copytree(item, site / item.name, dirs_exist_ok=True)
        elif ".part" in item.name:
            shutil.copy(item, site / item.name)
    parts = [site / f"{manifest['gguf']}.part{i}" for i in (1, 2)]
    if all(p.exists() for p in parts):
        data = b"".join(p.read_bytes() for p in parts)
        for p in parts:
            p.unlink()
        if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise SystemExit(f"The joined {manifest['gguf']} does not match its sha256: carry both parts again.")
        gguf = site / manifest["package"] / manifest["gguf"]
        gguf.write_bytes(data)
        print(f"joined and checked {gguf}")
    print(f"unpacked part {manifest['part']} into {site}")


# ------------------------------------------------------------------ the comparison
def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Train (unless ``untrained``) and evaluate one mode; the record of the table."""
    from memlong import MemLong
    from memlong.evaluation import passkey
    from memlong.train import TrainConfig, evaluate, shakespeare_split, train

    # float32 weights; training runs under bf16 autocast on a GPU that has it (TrainConfig.precision="auto")
    ml = MemLong.from_pretrained(args.model, device=args.device, dtype=torch.float32, memory_capacity=65_536,
                                 **MODES[mode])
    train_docs, held_out = shakespeare_split()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    record: dict = {"mode": mode, **MODES[mode]}
    if mode != "untrained":
        result = train(ml, train_docs, TrainConfig(
            output_dir=Path(args.runs) / mode, max_steps=args.steps, max_seconds=60 * args.minutes if args.minutes
            else None, grad_accum=args.grad_accum, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
            learning_rate=args.lr, eval_tokens=args.eval_tokens, save_every=25, progress=not args.quiet),
            eval_documents=held_out, base_model=args.model)
        record.update({k: v for k, v in result.to_dict().items() if k not in ("eval_before", "eval_after")},
                      ppl_before=result.eval_before.get("ppl"), ppl=result.eval_after.get("ppl"))
    else:
        record["ppl"] = evaluate(ml, held_out, tokens=args.eval_tokens)["ppl"]
    reading = ("window",) if mode == "window" else ("memlong",)
    pk = passkey(ml, lengths=[args.passkey_length], trials=args.passkey_trials, modes=reading, progress=False)[0]
    record.update(passkey_mode=reading[0], passkey_correct=sum(t["correct"] for t in pk["per_trial"]),
                  passkey_trials=pk["trials"], passkey_key_nll=pk["key_nll"], passkey_failed=pk["failed"],
                  passkey_per_trial=pk["per_trial"])
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIRS", help="write the three carry parts to these comma-separated folders")
    p.add_argument("--unpack", metavar="DIR", help=f"install one carried part into --site (default {SITE})")
    p.add_argument("--site", default=SITE, help=f"where --unpack installs (default {SITE}; put it on PYTHONPATH)")
    p.add_argument("--modes", default="memory_layer,per_layer,window,untrained",
                   help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    p.add_argument("--model", default="default", help="MemLong.from_pretrained name or path (default: the default)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per mode (the schedule's length)")
    p.add_argument("--minutes", type=float, default=None, help="training time per mode; stops early, resumable")
    p.add_argument("--runs", default="runs/train-gpu", help="checkpoint folders, one per mode (a rerun resumes)")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per play scored (default 4096)")
    p.add_argument("--passkey-length", type=int, default=32_768)
    p.add_argument("--passkey-trials", type=int, default=5)
    p.add_argument("--random-3b", action="store_true", help="instead: LoRA steps of a random OpenLLaMA-3B-shaped "
                                                              "Llama, for tokens/s and peak memory only")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--plot", metavar="PNG", help="loss curves of the trained modes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.prepare:
        prepare([Path(f) for f in args.prepare.split(",")])
        return 0
    if args.unpack:
        unpack(Path(args.unpack), Path(args.site))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: pass --device cpu for a smoke run.")
    if args.random_3b:
        return random_3b(args)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {','.join(MODES)}")
    records = []
    for mode in modes:
        t0 = time.perf_counter()
        records.append({**run_mode(mode, args), "wall_s": time.perf_counter() - t0,
                        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"})
        print_table(records)
        if args.json:
            Path(args.json).write_text(json.dumps({"config": vars(args), "records": records}, indent=1))
    if args.plot:
        plot(records, args.plot)
    return 0


def print_table(records: list[dict]) -> None:
    print("| mode | steps | tokens/s | held-out ppl (before → after) | passkey | failed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in records:
        before = f"{r['ppl_before']:.2f} → " if r.get("ppl_before") else ""
        tps = f"{r['tokens_per_second']:.0f}" if r.get("tokens_per_second") else "—"
        print(f"| {r['mode']} | {r.get('steps', 0)} | {tps} | {before}{r['ppl']:.2f} | "
              f"{r['passkey_correct']}/{r['passkey_trials']} ({r['passkey_mode']}) | {r['passkey_failed']} |")


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        if r.get("losses"):
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["mode"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def random_3b(args: argparse.Namespace) -> int:
    """LoRA steps of a random-weight Llama with OpenLLaMA-3B's shape: tokens/s and peak memory, nothing else."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memlong import MemLong
    from memlong.default_model import default_model_path
    from memlong.train import TrainConfig, shakespeare_split, train

    folder = tempfile.mkdtemp(prefix="openllama3b-shape-")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ml = MemLong.from_pretrained(folder, device=args.device, dtype=torch.float32, top_k=8, memory_capacity=65_536,
                                 **MODES["memory_layer"])
    train_docs, _ = shakespeare_split()
    result = train(ml, train_docs, TrainConfig(
        output_dir=tempfile.mkdtemp(prefix="memlong-train-gpu-"), max_steps=args.steps, grad_accum=args.grad_accum,
        lora_rank=64, lora_alpha=128.0, learning_rate=5e-5, eval_tokens=0, save_every=50))
    record = {"model": "random OpenLLaMA-3B shape", "device": args.device,
              **{k: v for k, v in result.to_dict().items() if k != "losses"}}
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps([record], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
