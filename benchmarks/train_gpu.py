"""GPU check of `memlong train`: a few hundred LoRA steps of a larger Llama, tokens/s and peak memory.

    python benchmarks/train_gpu.py --model /path/to/llama --steps 300 --json train-gpu.json
    python benchmarks/train_gpu.py --steps 300            # no local model: a random-weight OpenLLaMA-3B-shaped
                                                       # Llama (26 layers, hidden 3200), throughput/memory only

Trains on the shakespeare split (memlong.train.shakespeare_split) in the paper's mode (kv_source
"memory_layer", position_layout "zero", bf16 autocast), 1,024-token local window, segments of 512 tokens,
gradient accumulation 4. Prints one JSON record: steps, tokens, tokens_per_second, peak_device_mb (CUDA
max_memory_allocated), peak_rss_mb, loss at the start and the end, held-out perplexity before/after (only
meaningful with real weights). Nothing is downloaded: pass a local model folder, or use the random one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def random_openllama_3b(path: str) -> str:
    """Save a random-weight Llama with OpenLLaMA-3B's shape (and the default model's tokenizer) to ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memlong.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF model folder (default: random OpenLLaMA-3B shape)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this script measures GPU training. On a CPU use `memlong train`.")

    from memlong import MemLong
    from memlong.train import TrainConfig, shakespeare_split, train

    model = args.model or random_openllama_3b(tempfile.mkdtemp(prefix="openllama3b-shape-"))
    ml = MemLong.from_pretrained(model, device="cuda", dtype=torch.float32, kv_source="memory_layer",
                                 position_layout="zero", top_k=8, memory_capacity=65_536)
    train_docs, held_out = shakespeare_split()
    torch.cuda.reset_peak_memory_stats()
    out = args.output or tempfile.mkdtemp(prefix="memlong-train-gpu-")
    result = train(ml, train_docs, TrainConfig(
        output_dir=out, max_steps=args.steps, grad_accum=args.grad_accum, lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank, learning_rate=args.lr, precision="auto", eval_tokens=4096 if args.model else 0,
        gradient_checkpointing=args.gradient_checkpointing, save_every=50), eval_documents=held_out,
        base_model=str(model))
    record = {"model": args.model or "random OpenLLaMA-3B shape", "device": torch.cuda.get_device_name(),
              **{k: v for k, v in result.to_dict().items() if k != "losses"},
              "loss_first": result.losses[0] if result.losses else None,
              "loss_last": result.losses[-1] if result.losses else None}
    print(json.dumps(record, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([record], fh, indent=2)


if __name__ == "__main__":
    main()
