"""What a :class:`~memlong.MemLong` is built from: the decoders it accepts, loading one by name (with a trained
adapter merged in), the memory bank it gets, and the fingerprint of what its stored K-V depend on.

``MemLong.__init__`` and ``MemLong.from_pretrained`` call these; nothing here runs the model.

Example:
    >>> from memlong.loading import SUPPORTED_ARCHITECTURES, check_architecture
    >>> SUPPORTED_ARCHITECTURES
    ('llama', 'mistral', 'qwen2')
    >>> check_architecture("gpt2")
    Traceback (most recent call last):
    ValueError: Unsupported model architecture 'gpt2': ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memlong.config import MemLongConfig
from memlong.dtypes import dtype_name, to_dtype
from memlong.embedder import Embedder, TextEmbedder
from memlong.kv_cache import DeviceCache
from memlong.memory import MemoryBank
from memlong.records import as_list, check_namespace
from memlong.storage import is_disk_bank
from memlong.user_warning import warn

if TYPE_CHECKING:
    from memlong.model import MemLong

__all__ = ["SUPPORTED_ARCHITECTURES", "check_architecture", "check_model", "check_positions", "check_rope",
           "check_sliding_window", "check_stored_kv", "describe", "load_pretrained", "memory_fingerprint", "new_bank",
           "sink_ids", "warn_model", "weights_hash"]

# Decoders whose attention is q/k/v/o projections (Qwen2: with biases) + standard RoPE + the transformers attention
# registry, each tested for exactness on a tiny random-weight model (tests/test_architectures.py). Sliding windows
# (Mistral) are not applied: exact while a query's visible span fits the window, a warning otherwise.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def check_architecture(model_type: str | None) -> None:
    """Raise ``ValueError`` unless ``model_type`` (``model.config.model_type``) is a supported decoder."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"Unsupported model architecture {model_type!r}: MemLong supports {SUPPORTED_ARCHITECTURES} "
                         "(Llama-family decoders with standard RoPE attention). Pick a model of one of these types.")


def check_model(model: Any) -> None:
    """Raise unless ``model`` is a causal LM of a supported architecture, with its language-model head."""
    check_architecture(getattr(getattr(model, "config", None), "model_type", None))
    if not (hasattr(model, "model") and hasattr(model, "lm_head")):
        raise TypeError(f"MemLong needs a causal language model with its head (AutoModelForCausalLM, e.g. "
                        f"LlamaForCausalLM), got a {type(model).__name__}.")


def warn_model(model_config: Any, cfg: MemLongConfig) -> None:
    """The warnings of :func:`check_sliding_window` and :func:`check_rope` (what MemLong's attention cannot match), and
    of :func:`check_positions` (a config the model has too few positions for)."""
    check_sliding_window(model_config, cfg)
    check_rope(model_config)
    check_positions(model_config, cfg)


def _memory_span(cfg: MemLongConfig) -> int:
    """The most retrieved tokens an answer reads: ``top_k`` chunks and ``retrieve_next`` after each."""
    return cfg.top_k * (1 + cfg.retrieve_next) * cfg.chunk_size


def check_positions(model_config: Any, cfg: MemLongConfig) -> None:
    """Warn when a full local window (and the sink) cannot fit the model's positions (a long ingest fails once a
    step's positions pass them; short texts still work), or when answers with ``top_k`` retrieved chunks in the ``continual``
    layout may not (``generate`` refuses them, after a whole ingest)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    sink = 1 if cfg.attention_sink else 0
    if sink + cfg.local_window > limit:
        warn(f"A full local_window ({cfg.local_window}){' and the sink' if sink else ''} need "
             f"{sink + cfg.local_window} positions; the model has {limit}, so ingesting a long text will "
             f"fail once a step's positions pass {limit}. Set local_window to at most {limit - sink}.")
    need = sink + _memory_span(cfg) + cfg.local_window
    if cfg.position_layout == "continual" and need > limit:
        warn(f"An answer may need up to {need} positions (sink + top_k * (1 + retrieve_next) * chunk_size + "
             f"a prompt of local_window tokens) in the continual layout; the model has {limit}, and generate "
             "refuses what does not fit. Lower top_k, chunk_size or local_window, or use position_layout='zero'.")


def check_sliding_window(model_config: Any, cfg: MemLongConfig) -> None:
    """Warn when a query may see more than a sliding-window model's window (Mistral; Qwen2 with sliding layers).

    MemLong's attention shows every query ``[sink | memory | local cache]``, the design's point; it applies no
    sliding window. Within the window that is exactly the stock model (tests/test_architectures.py); beyond it the
    model reads keys it was never trained to see at that distance.
    """
    window = getattr(model_config, "sliding_window", None)
    layer_types = getattr(model_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return
    span = 1 + _memory_span(cfg) + cfg.local_window
    if span > window:
        warn(f"This model was trained with a sliding window of {window} tokens, but a query may see up to "
             f"{span} (sink + top_k * (1 + retrieve_next) * chunk_size + local_window); MemLong applies no "
             "sliding window, so outputs differ from the stock model's beyond it. Lower top_k, retrieve_next "
             "or local_window to stay exact.")


def check_rope(model_config: Any) -> None:
    """Warn for RoPE whose frequencies change with the sequence length (``rope_type="dynamic"``): stored keys are
    rotated at answer time with the frequencies of the current call, so memory read past
    ``max_position_embeddings`` no longer matches what the model computes for the same text in one pass."""
    scaling = getattr(model_config, "rope_scaling", None) or getattr(model_config, "rope_parameters", None) or {}
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "dynamic":
        warn("This model uses dynamic RoPE scaling (rope_type='dynamic'), whose frequencies change once a "
             "sequence passes max_position_embeddings; memory read beyond that is approximate (max |diff| "
             "2e-3 against full attention on a tiny model, exact within it). Use a model with static RoPE "
             "scaling (default, linear, llama3, yarn) for exact memory at any length.")


def sink_ids(tokenizer: Any, config: MemLongConfig) -> list[int]:
    """The shared sink: ``[BOS]`` (the EOS for a tokenizer without one), ``[]`` without ``attention_sink`` or either."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [int(bos)] if (config.attention_sink and bos is not None) else []


def describe(ml: MemLong) -> str:
    """``repr(ml)``: the model's name and depth, and the memory settings that shape answers."""
    c = ml.config
    return (f"MemLong({getattr(ml.model.config, 'name_or_path', '?')!r}, layers={ml.num_layers}, "
            f"kv_source={c.kv_source!r}, retrieval_layers={c.retrieval_layers}, top_k={c.top_k}, "
            f"local_window={c.local_window}, bank={ml.bank!r})")


def new_bank(ml: MemLong, embedder: TextEmbedder | str | None) -> MemoryBank:
    """The :class:`MemoryBank` a new MemLong gets: ``embedder`` ``None``/``"default"`` (packaged
    all-MiniLM-L6-v2), a sentence-transformers name, or an embedder object; sizes, placement and storage tier from
    ``ml.config``. With ``memory_path`` a directory that already holds a disk bank is reopened (its fingerprint
    must match ``ml``'s); a new disk bank is committed empty so that it records the model that fills it."""
    cfg = ml.config
    if embedder in (None, "default"):
        emb: TextEmbedder = Embedder()
    else:
        emb = Embedder(embedder) if isinstance(embedder, str) else embedder
    options: dict[str, Any] = dict(
        capacity=cfg.memory_capacity, evict_oldest=cfg.evict_oldest, keep_newest=cfg.keep_newest,
        dtype=cfg.torch_memory_dtype, max_bytes=cfg.memory_max_bytes, search_mode=cfg.search_mode,
        device=ml.device if cfg.memory_device == "model" else "cpu", pin_memory=storage_tier(ml) == "pinned",
        quantization=cfg.memory_quantization, ann_min_chunks=cfg.memory_ann_chunks)
    if cfg.memory_path is not None and (Path(cfg.memory_path) / "manifest.json").exists():  # reopen a disk bank
        if not is_disk_bank(cfg.memory_path):
            raise ValueError(f"memory_path {str(cfg.memory_path)!r} holds a memory bank saved with save_memory(), not a "
                             "disk bank, so it would be read into RAM and nothing written later would reach the disk. "
                             "Load it with ml.load_memory(path) on a model without memory_path, or move it to disk: "
                             "give memory_path a new folder, then ml.load_memory(path) and ml.bank.commit().")
        return MemoryBank.load(cfg.memory_path, embedder=emb, fingerprint=memory_fingerprint(ml), evict=False,
                               **options)  # (memory_capacity is always given: its default evicted a larger bank)
    bank = MemoryBank(embedder=emb, path=cfg.memory_path, **options)
    if bank.path is not None:
        bank.commit(fingerprint=memory_fingerprint(ml))
    return bank


def check_shared_bank(ml: MemLong, bank: MemoryBank) -> MemoryBank:
    """``bank`` (given to ``MemLong(..., bank=)``, e.g. shared with another model) unless ``ml.config`` sets a storage
    or search option the bank does not have (ValueError naming them): they were ignored, silently (a
    ``memory_path`` user believed the K-V went to disk). An option set to its default cannot be told from one left
    out, so it is not compared (the bank's own applies)."""
    if not isinstance(bank, MemoryBank):
        raise TypeError(f"bank must be a MemoryBank (e.g. another MemLong's .bank), got {type(bank).__name__}.")
    cfg, default = ml.config, MemLongConfig()
    path = None if bank.path is None else str(bank.path.resolve())
    found = {"memory_path": path, "memory_quantization": bank.quantization, "memory_dtype": dtype_name(bank.dtype),
             "search_mode": bank.search_mode, "memory_capacity": bank.capacity, "memory_max_bytes": bank.max_bytes,
             "evict_oldest": bank.evict_oldest, "keep_newest": bank.keep_newest, "memory_ann_chunks": bank.ann_min_chunks}
    mine = {**{k: getattr(cfg, k) for k in found},
            "memory_path": None if cfg.memory_path is None else str(Path(cfg.memory_path).resolve())}
    wrong = [f"{k}={getattr(cfg, k)!r} (the bank's: {found[k]!r})" for k in found
             if getattr(cfg, k) != getattr(default, k) and mine[k] != found[k]]
    if wrong:
        raise ValueError(f"A MemLong given a bank uses it as it is, but its config sets {'; '.join(wrong)}. Drop "
                         "those options (the bank's own apply), or let this model make its own bank (no bank=).")
    return bank


def storage_tier(ml: MemLong) -> str:
    """Where a new bank of ``ml`` keeps its K-V: ``"cpu"``, ``"pinned"`` or ``"model"``; ``memory_device="auto"``
    is ``"pinned"`` for a model on CUDA without ``memory_path`` (a disk bank maps its files), else ``"cpu"``."""
    cfg = ml.config
    if cfg.memory_device != "auto":
        return cfg.memory_device
    return "pinned" if ml.device.type == "cuda" and cfg.memory_path is None else "cpu"


def new_cache(ml: MemLong) -> DeviceCache | None:
    """The device cache above ``ml``'s bank (``MemLongConfig.memory_cache_bytes``), or ``None`` for none (also
    for ``"auto"`` when a shared bank already lives on the model's device)."""
    cfg = ml.config
    size = cfg.memory_cache_bytes
    if size is None and cfg.memory_device == "auto" and ml.device.type == "cuda" and ml.bank.device != ml.device:
        size = torch.cuda.mem_get_info(ml.device)[0] // 4  # a quarter of the GPU memory free with the model loaded
    return DeviceCache(ml.device, size) if size else None


def load_pretrained(cls: type[MemLong], name_or_path: str | Path, *, embedder: TextEmbedder | str | None,
                    device: str | torch.device | None, dtype: torch.dtype | str | None, adapter: str | Path | None,
                    config: dict[str, Any]) -> MemLong:
    """The body of :meth:`MemLong.from_pretrained` (see there): resolve ``"default"``, pick device and dtype
    (CUDA + bf16 when available, else CPU + fp32), load tokenizer and model, and merge ``adapter`` with the
    config it was trained with as defaults (``config`` keywords override them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"from_pretrained takes a model name or folder, got a {type(name_or_path).__name__}; to use a "
                        "model object you already have, wrap it: MemLong(model, tokenizer, config).")
    path = str(name_or_path)
    if path == "default":
        from memlong.default_model import default_model_path

        path = str(default_model_path())
    local = Path(path).expanduser()
    if local.is_dir():
        path = str(local.resolve())  # "~" expanded (transformers took it for a hub id), absolute: the fingerprint
        # names one folder however it was typed (a relative path warned "saved from another model" when loaded absolute)
    elif local.exists() or local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
        raise ValueError(f"Model {path!r}: no such folder. Give 'default', a Hugging Face model id ('org/name'), or a "
                         "folder with config.json and weights.")
    device = str(device) if device is not None else "cuda" if torch.cuda.is_available() else "cpu"  # torch.device too
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this torch ({torch.__version__}) sees no CUDA GPU; use device='cpu', "
                         "or leave device out to pick one.")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        hf_config = AutoConfig.from_pretrained(path)
        check_architecture(getattr(hf_config, "model_type", None))  # before the weights load
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        if local.is_dir():
            raise
        raise OSError(f"Model {path!r}: there is no folder of that name in {Path.cwd()}, and as a Hugging Face model "
                      f"id it could not be loaded ({str(exc).splitlines()[0][:200]}). Check the path, or give "
                      "'default' or a model id that is in the local Hugging Face cache.") from None
    meta, settings = None, _checked_options(config)
    if adapter is not None:
        from memlong.adapter import ADAPTER_CONFIG_FIELDS, read_adapter_config

        meta = read_adapter_config(adapter)
        layers, name = meta.get("layers") or [], (meta.get("base_model") or {}).get("name", "another model")
        if layers and max(layers) >= hf_config.num_hidden_layers:  # before its config is read against this model
            raise ValueError(f"Adapter {str(adapter)!r} was trained on {name!r} (layers up to {max(layers)}); this "
                             f"model ({path}) has {hf_config.num_hidden_layers} layers. Load it on the model it was "
                             "trained on.")
        trained = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["memlong_config"].items()
                   if k in ADAPTER_CONFIG_FIELDS}
        settings = {**trained, **settings}
    try:
        resolved = MemLongConfig(**settings).resolve(hf_config.num_hidden_layers)  # every option, before the weights
    except ValueError as exc:
        if meta is None:
            raise
        raise ValueError(f"{exc} (The adapter {str(adapter)!r} was trained with {trained}: these are this model's "
                         "defaults; a keyword overrides them.)") from None
    if meta is not None and meta["method"] == "reader":
        from memlong.reader import check_reader_layout

        check_reader_layout(resolved)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=to_dtype(dtype)).to(device)
    ml = cls(model, tokenizer, MemLongConfig(**settings), embedder=embedder)
    if meta is None:
        return ml
    if meta["method"] == "reader":  # LoRA kept apart, active when memory is read
        from memlong.reader import attach_reader

        attach_reader(ml, adapter)
        return ml
    from memlong.adapter import load_adapter

    load_adapter(model, adapter)
    ml.weights_changed()
    return ml


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` unless one is not a :class:`MemLongConfig` field (TypeError naming the closest fields)."""
    import difflib

    fields = [f.name for f in dataclasses.fields(MemLongConfig)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        hints = {u: difflib.get_close_matches(u, fields, n=1) for u in unknown}
        near = "; ".join(f"{u!r}: did you mean {h[0]!r}?" for u, h in hints.items() if h)
        raise TypeError(f"Unknown MemLong option(s) {unknown}{f' ({near})' if near else ''}. The options are "
                        "MemLongConfig's fields (memlong.MemLongConfig); nothing was loaded.")
    return dict(options)


def memory_fingerprint(ml: MemLong) -> dict[str, Any]:
    """What ``ml``'s stored K-V depend on; saved with a memory and compared when it is loaded. ``model`` (a path
    or hub id) only warns, and only for memory saved before ``weights`` (:func:`weights_hash`) existed. See
    :meth:`MemLong.save_memory`."""
    cfg = ml.model.config
    return {"architecture": cfg.model_type, "num_layers": ml.num_layers, "hidden_size": int(cfg.hidden_size),
            "kv_heads": ml.kv_heads, "head_dim": ml.head_dim, "vocab_size": int(cfg.vocab_size),
            "source_layers": list(ml.config.source_layers), "kv_source": ml.config.kv_source,
            "chunk_size": ml.config.chunk_size, "sink_ids": list(ml.sink_ids),  # every stored K-V attended to it
            **weights_hash(ml), "model": str(getattr(cfg, "name_or_path", "") or "")}


def weights_hash(ml: MemLong) -> dict[str, Any]:
    """``{"weights": [h1, h2], "rope": [...]}``: what the stored K-V are computed from. ``weights``: two short
    sha256 of the token embeddings and every weight of the decoder layers up to the highest source layer (every 16th
    row of each matrix; a fine-tune or a merged adapter changes them all), rounded to bfloat16 directly (``h1``) and
    through float16 (``h2``), so that one checkpoint loaded in float32, bfloat16 or float16, on a GPU or not, shares a
    hash with itself (a float32 checkpoint's bfloat16 and float16 roundings differ: they match its float32 load, not
    each other). LoRA factors kept apart (a reader) are left out: stored K-V never read them. ``rope``: the RoPE
    base, type and factor. The weights at the time of the call: save memory before changing weights in place.
    No ``weights`` for weights that are not materialized (meta tensors)."""
    cfg, top = ml.model.config, max(ml.config.source_layers)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    out: dict[str, Any] = {"rope": [rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
                                    rope.get("rope_type", rope.get("type")), rope.get("factor")]}
    digests = [hashlib.sha256(), hashlib.sha256()]
    modules = [ml.decoder.get_input_embeddings(), *ml.decoder.layers[: top + 1]]
    for name, p in (item for m in modules for item in m.named_parameters()):
        if p.is_meta:
            return out
        if "lora_" not in name:  # (a LoRALinear's base weight comes in its place, under another name)
            t = (p.detach()[::16] if p.dim() > 1 else p.detach()).to("cpu")
            for digest, rounded in zip(digests, (t.to(torch.bfloat16),
                                                 t.clamp(-65504, 65504).to(torch.float16).to(torch.bfloat16))):
                digest.update(rounded.contiguous().view(torch.int16).numpy().tobytes())
    return {**out, "weights": [d.hexdigest()[:16] for d in digests]}


def fetch_memory(ml: MemLong, chunk_ids: Sequence[str], namespace: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The body of :meth:`MemLong.memory_for`: from the bank through ``ml.kv_cache`` (when there is one), checked
    against ``ml``'s shapes; ``None`` for no ids. ``chunk_ids``: any list-like of ids (one string is refused)."""
    chunk_ids = as_list(chunk_ids, "chunk_ids")
    check_namespace(namespace)  # also for no ids (bank.fetch checks it where there are)
    if not chunk_ids:
        return None
    keys, values = ml.bank.fetch(chunk_ids, namespace=namespace, device=ml.device, dtype=ml.dtype, cache=ml.kv_cache)
    check_stored_kv(ml, keys)
    return keys, values


def resolve_config(config: Any, num_layers: int) -> MemLongConfig:
    """``config`` (``None``: the defaults) resolved for a ``num_layers``-deep model; TypeError for anything but a
    :class:`MemLongConfig` (a dict failed with AttributeError 'resolve')."""
    if config is None:
        return MemLongConfig().resolve(num_layers)
    if not isinstance(config, MemLongConfig):
        raise TypeError(f"config must be a MemLongConfig, got {type(config).__name__}: pass MemLongConfig(**options), "
                        "or the options as keywords to MemLong.from_pretrained(name, **options).")
    return config.resolve(num_layers)


def check_memory(ml: MemLong, memory: Any) -> None:
    """TypeError / ValueError unless ``memory`` is ``None`` or a ``(keys, values)`` pair of floating-point tensors of
    one shape that fits ``ml`` (:func:`check_stored_kv`): what :meth:`MemLong.memory_for` returns."""
    if memory is None:
        return
    if not (isinstance(memory, (tuple, list)) and len(memory) == 2 and all(isinstance(t, torch.Tensor) for t in memory)):
        raise TypeError(f"memory must be a (keys, values) pair of tensors, as ml.memory_for(chunk_ids, namespace) "
                        f"returns; got {type(memory).__name__}.")
    keys, values = memory
    if keys.dim() != 4 or keys.shape != values.shape or not (keys.is_floating_point() and values.is_floating_point()):
        raise ValueError(f"memory keys and values must be floating-point (L_src, Hkv, M, D) tensors of one shape, got "
                         f"{tuple(keys.shape)} {keys.dtype} and {tuple(values.shape)} {values.dtype}.")
    check_stored_kv(ml, keys)


def check_stored_kv(ml: MemLong, keys: torch.Tensor) -> None:
    """ValueError unless fetched ``keys`` ``(L_src, Hkv, M, D)`` fit ``ml``: K-V stored by another model or
    ``kv_source`` have other layer, head or channel counts."""
    found, expected = (keys.shape[0], keys.shape[1], keys.shape[3]), (len(ml.config.source_layers), ml.kv_heads,
                                                                      ml.head_dim)
    if found != expected:
        raise ValueError(f"Stored K-V has shape (layers, heads, dim) = {found} but this model/config expects "
                         f"{expected}: the bank was filled by another model or kv_source. Use a fresh namespace or "
                         "the model that built it.")
