"""Outputs a refactor must not change, as JSON: run it on two trees and ``diff`` the results.

Tiny random-weight Llama (seconds): five deterministic training runs (LoRA over 2 epochs with held-out evaluation,
full fine-tuning, a resume mid-document, gradient checkpointing with ``grad_accum=3``, ``max_seconds=0``): their
losses, counters, adapter tensors (hashes), ``adapter.json`` and checkpoint positions. With ``--default-model``
(about a minute on the 2-core CPU) also the default model's perplexity with and without memory, a planted-fact
answer, a ``run``'s logits (hash) and the training ``forward``'s loss. Timings and memory peaks are left out.

Example (the tree measured is the one ``memlong`` is imported from)::

    $ git archive <old commit> memlong | tar -x -C /tmp/old
    $ PYTHONPATH=/tmp/old python .ci/same_outputs.py --default-model > old.json
    $ PYTHONPATH=. python .ci/same_outputs.py --default-model > new.json && diff old.json new.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOLATILE = ("seconds", "peak_rss_mb", "peak_device_mb", "tokens_per_second", "adapter_path")
TINY = dict(kv_source="memory_layer", position_layout="zero", chunk_size=16, local_window=64, ingest_step=32, top_k=2,
            memory_dtype="float32")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def _summary(result: Any, out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    record = {k: v for k, v in result.to_dict().items() if k not in VOLATILE}
    record["tensors"] = {k: _digest(v) for k, v in sorted(load_file(str(out / "adapter.safetensors")).items())}
    meta = json.loads((out / "adapter.json").read_text())
    meta["result"] = {k: v for k, v in meta["result"].items() if k not in VOLATILE}
    meta["train_config"].pop("output_dir", None)
    record["adapter_json"] = meta
    if (out / "checkpoint.json").exists():
        ckpt = json.loads((out / "checkpoint.json").read_text())
        record["checkpoint"] = {k: ckpt[k] for k in ("step", "position", "losses")}
    return record


def training_runs(root: Path) -> dict[str, Any]:
    """The five tiny training runs (output folders under ``root``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memlong import Embedder, MemLong, MemLongConfig
    from memlong.default_model import default_model_path
    from memlong.evaluation import shakespeare_text
    from memlong.train import TrainConfig, train

    tok = AutoTokenizer.from_pretrained(default_model_path())
    embedder = Embedder()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    ids = tok(shakespeare_text("macbeth"), add_special_tokens=False)["input_ids"]
    docs = [("d0", tok.decode(ids[:300])), ("d1", tok.decode(ids[4000:4250])), ("d2", tok.decode(ids[7000:7180]))]
    held_out = [("h", tok.decode(ids[9000:9200]))]

    def fresh() -> MemLong:  # same base weights and LoRA initialisation every time
        torch.manual_seed(0)
        return MemLong(copy.deepcopy(hf), tok, MemLongConfig(**TINY), embedder=embedder)

    def run(name: str, **cfg: Any) -> dict[str, Any]:
        config = {"grad_accum": 2, "learning_rate": 1e-3, "eval_tokens": 0, "progress": False, "save_every": 2, **cfg}
        evaluate = config["eval_tokens"] > 0
        result = train(fresh(), docs, TrainConfig(output_dir=root / name, **config),
                       eval_documents=held_out if evaluate else (), command="same_outputs")
        return _summary(result, root / name)

    out = {"lora_2_epochs_eval": run("a", epochs=2, warmup_steps=2, eval_tokens=200),
           "full": run("b", method="full", max_steps=5)}
    run("c", max_steps=3)
    out["resumed_mid_document"] = run("c", max_steps=7)
    out["grad_checkpointing_accum3"] = run("d", max_steps=4, gradient_checkpointing=True, grad_accum=3)
    out["max_seconds_0"] = run("e", max_seconds=0.0)
    return out


def default_model() -> dict[str, Any]:
    """The default model's perplexity, a planted-fact answer, a run's logits and a training forward's loss."""
    from memlong import MemLong
    from memlong.evaluation import planted_fact_documents, shakespeare_text

    ml = MemLong.from_pretrained("default", top_k=2, device="cpu")
    ids = ml.tokenize(shakespeare_text("macbeth"))[:3000]
    out: dict[str, Any] = {"ppl": ml.perplexity(ids, score_last=1024),
                           "ppl_local": ml.perplexity(ids, score_last=1024, use_memory=False)}
    (doc,), (fact,) = planted_fact_documents(1, plays=("hamlet",), chars=3000, distinct=True)
    ml.ingest(doc, namespace="h", progress=False)
    question = f"\nQuestion: {fact.question}\nAnswer:"
    out["answer"] = ml.generate(question, namespace="h", query=fact.question, answer_prefix=" " + fact.answer_prefix,
                                max_new_tokens=8)
    prompt = ml.encode_prompt(question)
    chunk_ids = [h.chunk_id for h in ml.bank.search(fact.question, namespace="h", k=2)]
    with torch.no_grad():
        out["run_logits"] = _digest(ml.run(prompt, memory=ml.memory_for(chunk_ids, "h")).logits)
        out["forward_loss"] = float(ml.forward(torch.tensor([prompt]), labels=torch.tensor([prompt]),
                                               namespace="h")["loss"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-model", action="store_true", help="also the default model's outputs (~1 min)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same reductions on every run
    import memlong

    print(f"memlong from {Path(memlong.__file__).parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        record = {"training": training_runs(Path(tmp))}
    if args.default_model:
        record["default_model"] = default_model()
    print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
