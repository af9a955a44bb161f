"""Adapters for the upper layers: a small LoRA written with plain torch, and the adapter files.

An adapter is a folder with two files:

* ``adapter.safetensors``: LoRA factors ``{name}.lora_A`` ``(r, in)`` / ``{name}.lora_B`` ``(out, r)`` for
  each adapted linear layer ``name`` (``method="lora"``), or the trained parameters themselves under their
  model names (``method="full"``);
* ``adapter.json``: ``method``, ``lora`` (rank, alpha, targets), ``layers`` (the trained layers), the
  ``memlong_config`` fields the adapter was trained with (kv_source, position_layout, memory_layer,
  retrieval_layers, chunk_size, attention_sink), the ``base_model`` name and weight ``fingerprint``, the data
  split, the command and the training/evaluation records.

Loading merges LoRA into the base weights (``W += alpha / r * B @ A``), so inference runs the plain model at
full speed. ``MemLong.from_pretrained(..., adapter=PATH)`` does it for you (and refuses an adapter trained on
other base weights).

Example:
    >>> ml = MemLong.from_pretrained("default", adapter="runs/shakespeare")   # config from the adapter
    >>> ml.config.kv_source, ml.config.position_layout
    ('memory_layer', 'zero')
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlong.checkpoint import CHECKPOINT_NAME, write_new
from memlong.choices import PACKAGED_ADAPTERS

__all__ = ["ADAPTER_CONFIG_FIELDS", "LoRALinear", "PACKAGED_ADAPTERS", "add_lora", "check_lora_factors", "fingerprint",
           "load_adapter", "lora_state_dict", "merge_lora", "read_adapter_config", "resolve_adapter", "save_adapter"]

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.json"
FORMAT = "memlong-adapter"
# MemLongConfig fields that shape what the upper layers were trained to read; carried by the adapter.
ADAPTER_CONFIG_FIELDS = ("chunk_size", "memory_layer", "retrieval_layers", "kv_source", "position_layout",
                         "attention_sink")


class LoRALinear(nn.Module):
    """``base(x) + alpha / r * B(A(x))`` with ``base`` frozen; ``B`` starts at zero, so the wrapped layer
    starts as the base layer exactly. The factors are kept in float32 whatever the base dtype.

    Example:
        >>> layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.enabled = True
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:  # a reader's LoRA outside answer-time memory reads (memlong.reader)
            return self.base(x)
        update = (x.to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return self.base(x) + update.to(x.dtype)

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (no extra cost at inference)."""
        with torch.no_grad():
            delta = (self.lora_B @ self.lora_A) * self.scaling
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _modules(model: nn.Module, layers: Iterable[int], targets: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}`` of the attention projections ``targets`` in decoder layers ``layers``."""
    found = {}
    decoder_layers = model.model.layers
    for i in layers:
        attn = decoder_layers[i].self_attn
        for t in targets:
            if not hasattr(attn, t):
                raise ValueError(f"Layer {i}'s attention has no module {t!r}; LoRA targets must be among "
                                 "q_proj, k_proj, v_proj, o_proj.")
            found[f"model.layers.{i}.self_attn.{t}"] = getattr(attn, t)
    return found


def add_lora(model: nn.Module, layers: Iterable[int], *, rank: int, alpha: float,
             targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
             seed: int | None = None) -> dict[str, LoRALinear]:
    """Wrap the attention projections ``targets`` of ``layers`` in :class:`LoRALinear`; returns them by name.
    ``seed``: draw the A factors from a generator of their own seeded with it (the values ``torch.manual_seed(seed)``
    would give) and leave torch's global random state as it was; ``None``: draw from the global state."""
    wrapped, generators = {}, {}
    for name, module in _modules(model, layers, targets).items():
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already carries a LoRA adapter; merge it first (merge_lora).")
        device = module.weight.device
        if seed is not None and device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        lora = LoRALinear(module, rank=rank, alpha=alpha, generator=generators.get(device))
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, lora)
        wrapped[name] = lora
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` of ``model`` into its base layer and unwrap it; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, attr = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, attr, getattr(owner, attr).merged())
    return len(names)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name.lora_A, name.lora_B}`` of every LoRA layer of ``model`` (float32, on the CPU)."""
    return {f"{name}.{p}": getattr(m, p).detach().float().cpu().contiguous()
            for name, m in model.named_modules() if isinstance(m, LoRALinear) for p in ("lora_A", "lora_B")}


def fingerprint(model: nn.Module, layers: Iterable[int]) -> str:
    """A short hash of the base weights an adapter depends on: the model's shape, its token embeddings
    (every 16th row) and the attention projections of ``layers``. Computed in bfloat16, so the same weights
    loaded in float32 or bfloat16 give the same fingerprint."""
    cfg = model.config
    h = hashlib.sha256(json.dumps([cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size]).encode())
    tensors = [model.get_input_embeddings().weight[::16]]
    for module in _modules(model, layers, ("q_proj", "k_proj", "v_proj", "o_proj")).values():
        base = module.base if isinstance(module, LoRALinear) else module
        tensors.append(base.weight)
    for t in tensors:
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` into folder ``path`` (created); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_new(folder / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp))  # streamed: full upper layers are large
    write_new(folder / CONFIG_NAME, (json.dumps({"format": FORMAT, "version": 1, **meta}, indent=2) + "\n").encode())
    return folder


def check_output_dir(path: str | Path, method: str) -> None:
    """ValueError unless folder ``path`` can take a ``method`` adapter (``"lora"``/``"full"`` from ``memlong
    train``, ``"reader"`` from ``train-reader``): missing, empty, or holding a memlong adapter (and a ``train``
    checkpoint) of the same kind, which is then resumed or replaced. A folder with anything else is refused, so
    training never overwrites or mixes with other files."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Output {str(path)!r} is a file; give a new or empty folder.")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    links = sorted(p.name for p in folder.iterdir() if p.is_symlink())
    if links:  # (written files replace links, but a link here is someone's arrangement training would undo)
        raise ValueError(f"Output folder {str(path)!r} holds symbolic links ({', '.join(links[:3])}); training writes "
                         "its own files there. Give a new or empty folder.")

    want = "reader" if method == "reader" else "train"
    if (folder / CONFIG_NAME).exists():
        try:
            meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        ours = isinstance(meta, dict) and meta.get("format") == FORMAT
        found = ("reader" if meta.get("method") == "reader" else "train") if ours else None
    else:  # a run stopped before its first adapter save: its checkpoint (checked in full when resumed)
        found = "train" if (folder / CHECKPOINT_NAME).exists() else None
    if found != want:
        what = "a reader adapter (memlong train-reader)" if want == "reader" else "an adapter of memlong train"
        raise ValueError(f"Output folder {str(path)!r} is not empty and does not hold {what}; training would "
                         "overwrite or mix with what is there. Give a new or empty folder.")


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder for ``path``: a packaged adapter's name, a folder, or its ``adapter.json``."""
    if str(path) in PACKAGED_ADAPTERS:
        return Path(__file__).parent / "adapters" / PACKAGED_ADAPTERS[str(path)]
    folder = Path(path)
    if folder.is_file() and folder.name in (CONFIG_NAME, WEIGHTS_NAME):
        folder = folder.parent
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        known = f" or one of the packaged adapters {sorted(PACKAGED_ADAPTERS)}" if PACKAGED_ADAPTERS else ""
        raise ValueError(f"No adapter at {str(path)!r}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME} "
                         f"(what `memlong train` writes){known}.")
    return folder


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter.json`` as a dict (checked to be a memlong adapter)."""
    folder = resolve_adapter(path)
    meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_NAME} is not a memlong adapter (format {meta.get('format')!r}).")
    return meta


def check_lora_factors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> float:
    """The LoRA scaling (alpha / rank) of an adapter's ``meta`` after checking that each pair of factors in
    ``tensors`` fits the weight of ``model`` it adapts; ValueError naming the first that does not (a crafted file of
    300 bytes asked for a 4 TB product before any check)."""
    lora, params = meta.get("lora") or {}, dict(model.named_parameters())
    rank, alpha = lora.get("rank"), lora.get("alpha")
    if type(rank) is not int or rank < 1 or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"The adapter's lora rank {rank!r} / alpha {alpha!r} are not a positive integer and a number.")
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        weight = params.get(f"{name}.weight")
        if weight is None or weight.dim() != 2:
            raise ValueError(f"The adapter adapts {name!r}, which this model does not have.")
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None or tuple(a.shape) != (rank, weight.shape[1]) or \
                tuple(b.shape) != (weight.shape[0], rank):
            raise ValueError(f"The adapter's factors for {name!r} do not fit this model's weight "
                             f"{tuple(weight.shape)} at rank {rank}: the adapter was made for another model, or the "
                             "file is corrupted.")
    return float(alpha) / rank


def load_adapter(model: nn.Module, path: str | Path, *, check_fingerprint: bool = True) -> dict[str, Any]:
    """Apply the adapter at ``path`` to ``model`` in place (LoRA merged into the weights); returns its metadata.

    Raises:
        ValueError: not an adapter, or trained on other base weights (fingerprint mismatch), or names that the
            model lacks.
    """
    from safetensors.torch import load_file

    folder = resolve_adapter(path)
    meta = read_adapter_config(folder)
    layers = meta["layers"]
    if check_fingerprint:
        expected = meta.get("base_model", {}).get("fingerprint")
        actual = fingerprint(model, layers)
        if expected and expected != actual:
            raise ValueError(f"The adapter at {folder} was trained on base model "
                             f"{meta['base_model'].get('name')!r} (fingerprint {expected}) but this model's weights "
                             f"have fingerprint {actual}. Load the base model it was trained on.")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    with torch.no_grad():
        if meta["method"] == "lora":
            scaling = check_lora_factors(meta, tensors, model)
            for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
                weight = params[f"{name}.weight"]
                delta = (tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"]) * scaling
                weight += delta.to(weight.device, weight.dtype)
        elif meta["method"] == "full":
            for name, value in tensors.items():
                if name not in params:
                    raise ValueError(f"The adapter holds {name!r}, which this model does not have.")
                if value.shape != params[name].shape:  # copy_ would broadcast a smaller tensor silently
                    raise ValueError(f"The adapter's {name!r} is {tuple(value.shape)}; this model's is "
                                     f"{tuple(params[name].shape)}: the adapter was made for another model.")
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        else:
            raise ValueError(f"Unknown adapter method {meta['method']!r}; expected 'lora' or 'full'.")
    return meta
