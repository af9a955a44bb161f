"""Training checkpoints are safetensors + JSON (issue 16, defect 2): a resumed run continues exactly, a planted
pickle is never loaded, a tampered checkpoint is refused, and no library code unpickles."""

import copy
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from test_train import TINY, _text

from memlong import MemLong, MemLongConfig
from memlong.checkpoint import load_checkpoint, save_checkpoint
from memlong.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


class _Planted:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_resumed_run_continues_the_optimizer_exactly(tiny_hf, tokenizer, embedder, tmp_path):
    docs = [_text(tokenizer, 0, 200), _text(tokenizer, 4000, 200)]
    cfg = dict(grad_accum=2, learning_rate=1e-3, eval_tokens=0, save_every=1, progress=False)

    def fresh():  # the base weights and the same LoRA initialisation every time, as in a new process
        torch.manual_seed(0)
        return MemLong(copy.deepcopy(tiny_hf), tokenizer, MemLongConfig(**TINY, memory_dtype="float32"),
                       embedder=embedder)

    straight = train(fresh(), docs, TrainConfig(output_dir=tmp_path / "a", max_steps=4, **cfg))
    train(fresh(), docs, TrainConfig(output_dir=tmp_path / "b", max_steps=2, **cfg))
    record = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert record["step"] == 2 and record["optimizer"]["state"]  # AdamW moments are saved (as tensors)
    resumed = train(fresh(), docs, TrainConfig(output_dir=tmp_path / "b", max_steps=4, **cfg))
    assert resumed.resumed_from_step == 2
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-4)  # re-streamed memory: float noise
    assert len(list((tmp_path / "b").glob("checkpoint-*.safetensors"))) == 1  # older tensor files removed


def test_optimizer_and_scheduler_state_round_trip_exactly(tmp_path):
    weights = {"w": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.randn(3))}
    optimizer = torch.optim.AdamW(weights.values(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        (weights["w"].sum() * weights["b"].sum()).backward()
        optimizer.step()
        scheduler.step()
    left = [tmp_path / ".checkpoint.json.0123456789abcdef.tmp", tmp_path / ".adapter.json.0123456789abcdef.tmp"]
    for path in left:  # what a save killed before its rename leaves
        path.write_text("partial")
    (tmp_path / ".notes.0123456789abcdef.tmp").write_text("not ours")
    save_checkpoint(tmp_path, weights, optimizer, scheduler, {"step": 3, "note": "x"})
    assert not any(p.exists() for p in left) and (tmp_path / ".notes.0123456789abcdef.tmp").exists()
    state = load_checkpoint(tmp_path)
    assert state["step"] == 3 and state["note"] == "x"
    assert all(torch.equal(state["params"][n], p.detach()) for n, p in weights.items())
    again = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    again.load_state_dict(state["optimizer"])
    mine, theirs = optimizer.state_dict(), again.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    for i in mine["state"]:
        assert mine["state"][i].keys() == theirs["state"][i].keys()
        assert all(torch.equal(mine["state"][i][k], theirs["state"][i][k]) for k in mine["state"][i])
    assert state["scheduler"] == json.loads(json.dumps(scheduler.state_dict()))


def test_a_planted_pickle_is_never_loaded(make_tiny, tokenizer, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_bytes(pickle.dumps(_Planted(marker)))
    ml, _ = make_tiny(**TINY)
    with pytest.raises(ValueError, match="never unpickles|is not empty and does not hold an adapter"):
        train(ml, [_text(tokenizer, 0, 200)], TrainConfig(output_dir=tmp_path / "out", max_steps=1, progress=False,
                                                          eval_tokens=0))
    assert not marker.exists()


def test_a_tampered_checkpoint_is_refused(make_tiny, tokenizer, tmp_path):
    cfg = dict(output_dir=tmp_path, grad_accum=1, eval_tokens=0, save_every=1, progress=False)
    ml, _ = make_tiny(**TINY)
    train(ml, [_text(tokenizer, 0, 200)], TrainConfig(max_steps=1, **cfg))
    tensors = next(tmp_path.glob("checkpoint-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        train(ml, [_text(tokenizer, 0, 200)], TrainConfig(max_steps=2, **cfg))
    (tmp_path / "checkpoint.json").write_text("{" + "9" * 5000)
    with pytest.raises(ValueError, match="not valid JSON"):
        train(ml, [_text(tokenizer, 0, 200)], TrainConfig(max_steps=2, **cfg))


def test_no_library_code_unpickles():
    loads = re.compile(r"import (c?pickle|dill|joblib|marshal|shelve)|from (c?pickle|dill|joblib) import|"
                       r"pickle\.loads?\(|weights_only\s*=\s*False|torch\.load\(|allow_pickle\s*=\s*True|"
                       r"Unpickler|joblib\.load")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for folder in ("memlong", "memlong_integrations")
            for p in (ROOT / folder).rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if loads.search(line)]
    assert hits == []


def test_ctrl_c_checkpoints_the_last_finished_step_and_a_rerun_resumes_it(tiny_hf, tokenizer, embedder, tmp_path,
                                                                         monkeypatch):
    from memlong.train_loop import Trainer

    docs = [_text(tokenizer, 0, 200), _text(tokenizer, 4000, 200)]
    cfg = dict(grad_accum=2, learning_rate=1e-3, eval_tokens=0, save_every=10, progress=False, max_steps=4)

    def fresh():
        torch.manual_seed(0)
        return MemLong(copy.deepcopy(tiny_hf), tokenizer, MemLongConfig(**TINY, memory_dtype="float32"),
                       embedder=embedder)

    straight = train(fresh(), docs, TrainConfig(output_dir=tmp_path / "a", **cfg))
    segment, calls = Trainer._train_segment, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 8:  # 3 optimizer steps done, the 4th half accumulated: no checkpoint since (save_every=10)
            raise KeyboardInterrupt
        return segment(self, *args)

    monkeypatch.setattr(Trainer, "_train_segment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), docs, TrainConfig(output_dir=tmp_path / "b", **cfg))
    monkeypatch.setattr(Trainer, "_train_segment", segment)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 3
    resumed = train(fresh(), docs, TrainConfig(output_dir=tmp_path / "b", **cfg))
    assert resumed.resumed_from_step == 3
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-4)
    # the counters too: the half-accumulated step's segments are trained again, not counted twice
    assert (resumed.segments, resumed.tokens, resumed.segments_with_memory) == \
        (straight.segments, straight.tokens, straight.segments_with_memory)
