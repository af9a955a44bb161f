"""SDPA with MemLong's joint mask as a boolean tensor vs as a lower-right causal bias (the same mask).

Per call time and the largest difference from the float32 eager reference, for ``queries:visible keys``
shapes with 32 heads of dim 100 (the OpenLLaMA-3B shape), bf16 on CUDA, float32 elsewhere:

    python benchmarks/gpu_attention.py --json results/bench-gpu-h100-attention.json

Measured on an H100: README, "Benchmarks (GPU, H100)".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memlong.attention import _attention_sdpa, joint_attention


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="15:32768,512:1024,512:2048", help="comma-separated queries:visible_keys")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        lq, visible = (int(x) for x in shape.split(":"))
        q = torch.randn(1, args.heads, lq, args.head_dim, device=args.device, dtype=dtype)
        k = torch.randn(1, args.heads, visible + lq, args.head_dim, device=args.device, dtype=dtype)
        v = torch.randn_like(k)
        reference = joint_attention(q.float(), k.float(), v.float(), visible, 0.1, backend="eager")
        for lower_right in (False, True):
            out = _attention_sdpa(q, k, v, visible, 0.1, lower_right=lower_right)  # also the warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                _attention_sdpa(q, k, v, visible, 0.1, lower_right=lower_right)
            sync()
            rows.append({"queries": lq, "visible": visible, "mask": "lower-right bias" if lower_right else "boolean",
                         "ms_per_call": 1e3 * (time.perf_counter() - t0) / args.repeats,
                         "max_abs_diff_vs_fp32": (out.float() - reference).abs().max().item()})
            print(rows[-1], flush=True)
    if args.json:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "records": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
