"""Resumable training checkpoints as safetensors + JSON: nothing here (or anywhere in memlong) unpickles.

Contract:
    * A checkpoint in folder ``DIR`` is ``DIR/checkpoint.json`` (the commit point: step, losses, position in
      the data, the run's identity, counters, the optimizer's hyper-parameters and non-tensor state, the
      scheduler's state, and the name and sha256 of the tensor file) and ``DIR/checkpoint-<id>.safetensors``
      (``param.<name>``: trainable weights; ``optim.<i>.<key>``: the optimizer's per-parameter tensors).
    * Saving writes the tensor file under a fresh name, then the JSON under another, and ``os.replace``-s it over
      ``checkpoint.json``; older tensor files are removed after. A save that dies leaves the old checkpoint. Files
      are only ever created fresh and renamed into place (:func:`write_new`), so a symbolic link in the folder is
      replaced, never written through.
    * Loading reads the JSON (size-capped), checks the tensor file's sha256, and reads tensors with safetensors.
      Anything malformed raises ``ValueError`` naming the file and the fix. A ``checkpoint.pt`` left by an
      older memlong is a pickle: it is never loaded (the error says to delete it or start over).

Example:
    >>> save_checkpoint(out, params, optimizer, scheduler, {"step": 3, "losses": [2.1, 2.0, 1.9]})  # out: a folder
    >>> state = load_checkpoint(out)  # {"params": {...}, "optimizer": {...}, "scheduler": {...}, "step": 3, ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "LEGACY_NAME", "load_checkpoint", "save_checkpoint", "write_new"]

CHECKPOINT_NAME = "checkpoint.json"
LEGACY_NAME = "checkpoint.pt"
_TENSORS = re.compile(r"^checkpoint-[0-9a-f]{16}\.safetensors\Z")
_LEFT = re.compile(r"^\.(checkpoint[-.][0-9a-z.]+|adapter\.(json|safetensors)|losses\.json)\.[0-9a-f]{16}\.tmp\Z")
_JSON_LIMIT = 64 << 20  # losses of a long run fit easily


def write_new(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` (bytes, or a function that writes the file it is given, e.g. safetensors' ``save_file``, which
    streams large tensors) as file ``path``: into a file created under a fresh name in its folder (never an existing
    file, a link or a FIFO: ``O_EXCL | O_NOFOLLOW``), synced, then renamed over ``path``, which replaces a link there
    instead of writing to what it points at (another run's adapter, a user's file)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(tmp)  # into the file just created (the same inode: it was created empty, under a fresh name)
            else:
                fh.write(data)
                fh.flush()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(out: str | os.PathLike, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any]) -> Path:
    """Write trainable ``params``, the optimizer and scheduler states and ``state`` (JSON-able) to ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    opt = optimizer.state_dict()
    tensors = {f"param.{n}": p.detach().cpu().contiguous().clone() for n, p in params.items()}
    per_param: dict[str, dict[str, Any]] = {}
    for i, entry in opt["state"].items():
        plain = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                plain[key] = value
        per_param[str(i)] = plain
    name = f"checkpoint-{secrets.token_hex(8)}.safetensors"
    write_new(out / name, lambda tmp: save_file(tensors, tmp))  # streamed: a full-layer run's Adam state is large
    record = {"format": "memlong-checkpoint", "version": 1, "tensors": name,
              "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
              "optimizer": {"param_groups": opt["param_groups"], "state": per_param},
              "scheduler": scheduler.state_dict(), **state}
    write_new(out / CHECKPOINT_NAME, json.dumps(record).encode())  # the commit point
    for p in out.iterdir():  # older tensors, and what a killed save left under a fresh name
        if (_TENSORS.match(p.name) and p.name != name or _LEFT.match(p.name)) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
    return out / CHECKPOINT_NAME


def _bad(file: Path, problem: str) -> ValueError:
    return ValueError(f"Cannot resume from {file}: {problem} Delete the checkpoint files in {file.parent}, or start "
                      "over with resume=False (memlong train --no-resume).")


def load_checkpoint(out: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint in folder ``out`` as a dict (``params``, ``optimizer``, ``scheduler`` state dicts and the
    saved ``state`` keys), or ``None`` when there is none.

    Raises:
        ValueError: a malformed or tampered checkpoint, or a pickled ``checkpoint.pt`` of an older memlong.
    """
    from safetensors.torch import load_file

    out = Path(out)
    file = out / CHECKPOINT_NAME
    if not file.exists() and not file.is_symlink():
        if (out / LEGACY_NAME).exists():
            raise _bad(out / LEGACY_NAME, "it is a pickled checkpoint of an older memlong, and memlong never "
                                          "unpickles (a pickle can run code).")
        return None
    if file.is_symlink() or not file.is_file() or file.stat().st_size > _JSON_LIMIT:
        raise _bad(file, "it is not a regular file of a sane size.")
    try:
        record = json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _bad(file, f"it is not valid JSON ({str(exc)[:100]}).") from None
    ok = (isinstance(record, dict) and record.get("format") == "memlong-checkpoint" and record.get("version") == 1
          and isinstance(record.get("tensors"), str) and _TENSORS.match(record["tensors"])
          and isinstance(record.get("optimizer"), dict) and isinstance(record["optimizer"].get("state"), dict)
          and isinstance(record["optimizer"].get("param_groups"), list) and isinstance(record.get("scheduler"), dict))
    if not ok:
        raise _bad(file, "it is not a memlong checkpoint record.")
    tensor_file = out / record["tensors"]
    if tensor_file.is_symlink() or not tensor_file.is_file():
        raise _bad(file, f"its tensor file {tensor_file.name} is missing.")
    if hashlib.sha256(tensor_file.read_bytes()).hexdigest() != record.get("sha256"):
        raise _bad(file, f"{tensor_file.name} does not match its sha256 checksum.")
    try:
        tensors = load_file(tensor_file, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any reader error means a bad file
        raise _bad(file, f"{tensor_file.name} is not a valid safetensors file ({exc}).") from None
    state: dict[int, dict[str, Any]] = {}
    for key, plain in record["optimizer"]["state"].items():
        if not (key.isdigit() and isinstance(plain, dict)):
            raise _bad(file, "its optimizer state is malformed.")
        state[int(key)] = dict(plain)
    params = {}
    for name, t in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "param":
            params[rest] = t
        elif kind == "optim" and rest.partition(".")[0].isdigit():
            i, _, key = rest.partition(".")
            state.setdefault(int(i), {})[key] = t
        else:
            raise _bad(file, f"{tensor_file.name} holds an unexpected tensor {name[:80]!r}.")
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g, dict) and "betas" in g else g
              for g in record["optimizer"]["param_groups"]]
    skip = {"format", "version", "tensors", "sha256", "optimizer", "scheduler"}
    return {"params": params, "optimizer": {"state": state, "param_groups": groups},
            "scheduler": record["scheduler"], **{k: v for k, v in record.items() if k not in skip}}
