"""The trainer on one process: run-directory layout, exact resume, atomic checkpoints,
averaged accumulation, divergence handling. Tiny model, few steps."""

import json
from pathlib import Path

import pytest
import torch

from agdlm.checkpoint import latest_checkpoint
from agdlm.config import load_config
from agdlm.model import GPT
from agdlm.parallel import build_backend
from agdlm.parallel.env import DistEnv
from agdlm.train import Trainer, TrainingDiverged, train

OPTIMIZERS = [["optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=2"], ["optim.name=agd"],
              ["optim.name=muon", "optim.lr=1e-2", "optim.warmup_steps=2"], ["optim.name=prodigy", "optim.warmup_steps=2"],
              ["optim.name=schedulefree", "optim.warmup_steps=2"]]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    return torch.load(latest_checkpoint(Path(run_dir)) / "model.pt", weights_only=True)


def train_until_crash(cfg, before_step: int, monkeypatch) -> None:
    """Train `cfg` and crash (KeyboardInterrupt) just before optimiser step `before_step`."""
    original = Trainer.train_step

    def crashing(self, *args, **kwargs):
        if self.step == before_step - 1:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(Trainer, "train_step", original)


def cpu_env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_run_directory_layout(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.max_steps=4", "train.ckpt_interval=2", "train.eval_interval=2",
                                              "train.keep_checkpoints=1", "train.run_name=layout"])
    result = train(cfg, command_line=["agdlm", "train", "x"])
    run = Path(result["run_dir"])
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "DONE", "checkpoints/latest"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_4"]  # keep 1
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["world_size"] == 1 and prov["command_line"] == ["agdlm", "train", "x"] and "torch" in prov["packages"]
    kinds = [(r["kind"], r["step"]) for r in read_metrics(run)]
    assert ("eval", 0) in kinds and ("eval", 4) in kinds and ("train", 4) in kinds
    assert train(cfg)["finished_before"] is True  # DONE runs are not trained again


def streaming_demo_source():
    from agdlm.data.demo import write_demo_shard

    return [f"data.source={write_demo_shard()}", "data.mode=stream", "data.shuffle_buffer=16"]


@pytest.mark.parametrize(
    "optim, data",
    [(OPTIMIZERS[0], "memory"), (OPTIMIZERS[1], "memory"), (OPTIMIZERS[1], "stream"), (OPTIMIZERS[2], "memory"),
     (OPTIMIZERS[3], "memory"), (OPTIMIZERS[4], "memory")],
    ids=["adamw", "agd", "agd-streaming", "muon", "prodigy", "schedulefree"],
)
def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_overrides, optim, data, monkeypatch):
    if data == "stream":
        optim = optim + streaming_demo_source()
    common = tiny_overrides + optim + ["train.max_steps=6", "train.ckpt_interval=3", "train.eval_interval=3", "model.dropout=0.1"]
    straight = train(load_config(None, common + ["train.run_name=straight"]))

    train_until_crash(load_config(None, common + ["train.run_name=resumed"]), 5, monkeypatch)
    resumed = train(load_config(None, common + ["train.run_name=resumed"]))

    a, b = read_metrics(straight["run_dir"]), read_metrics(resumed["run_dir"])
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        key = "train_loss" if ra["kind"] == "train" else "val_loss"
        assert ra[key] == rb[key], (ra, rb)
    wa, wb = final_weights(straight["run_dir"]), final_weights(resumed["run_dir"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_checkpoint_write_keeps_previous(tiny_overrides, monkeypatch):
    from agdlm.parallel.base import Backend

    common = tiny_overrides + ["optim.name=adamw", "train.max_steps=4", "train.ckpt_interval=2", "train.run_name=atomic"]
    original = Backend.save

    def die_halfway(self, folder):
        if folder.name.endswith("step_4"):
            (folder / "model.pt").write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        return original(self, folder)

    monkeypatch.setattr(Backend, "save", die_halfway)
    with pytest.raises(OSError):
        train(load_config(None, common))
    run = Path(tiny_overrides[-1].split("=", 1)[1]) / "atomic"
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_2"
    state = torch.load(ckpt / "model.pt", weights_only=True)
    GPT(load_config(None, common).model).load_state_dict(state)
    monkeypatch.setattr(Backend, "save", original)
    assert train(load_config(None, common))["step"] == 4  # resumes from step 2 and finishes


def test_gradient_accumulation_averages(tiny_overrides):
    def grads(micro):
        cfg = load_config(None, tiny_overrides + ["optim.name=adamw", f"train.micro_batch_size={micro}"])
        torch.manual_seed(0)
        backend = build_backend(cfg, cpu_env())
        backend.setup(GPT(cfg.model), lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
        torch.manual_seed(1)
        x = torch.randint(0, 50257, (8, 32))
        y = torch.randint(0, 50257, (8, 32))
        steps = 8 // micro
        for i in range(steps):
            sl = slice(i * micro, (i + 1) * micro)
            backend.forward_backward(x[sl], y[sl], steps, i == steps - 1)
        return {n: p.grad.clone() for n, p in backend.raw_model.named_parameters()}

    one, two = grads(8), grads(4)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-5, atol=1e-7), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_overrides, monkeypatch):
    common = tiny_overrides + ["optim.name=adamw", "train.max_steps=6", "train.ckpt_interval=2", "train.run_name=nan"]
    original = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = original(self, idx, targets)
        if self.training and poisoned.calls >= 10:  # 2 micro-batches per step: from step 6 on
            loss = loss * float("nan")
        poisoned.calls += self.training
        return logits, loss

    poisoned.calls = 0
    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="step 6"):
        train(load_config(None, common))
    run = Path(tiny_overrides[-1].split("=", 1)[1]) / "nan"
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_4"
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (run / "DONE").exists()


def test_restart_before_first_checkpoint_starts_the_curve_anew(tiny_overrides, monkeypatch):
    common = tiny_overrides + ["optim.name=adamw", "train.max_steps=3", "train.ckpt_interval=10", "train.run_name=early"]
    train_until_crash(load_config(None, common), 2, monkeypatch)
    run = Path(train(load_config(None, common))["run_dir"])
    assert [(r["kind"], r["step"]) for r in read_metrics(run)] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert (run / "metrics.rolled_back.jsonl").is_file()  # the first attempt's records are kept aside


def test_resume_refuses_a_changed_schedule_or_checkpoint_layout(tiny_overrides):
    from agdlm.config import ConfigError

    common = tiny_overrides + ["optim.name=adamw", "train.max_steps=2", "train.run_name=changed"]
    train(load_config(None, common + ["train.ckpt_interval=1"]))
    (Path(tiny_overrides[-1].split("=", 1)[1]) / "changed" / "DONE").unlink()  # as if it had been killed
    with pytest.raises(ConfigError, match="cosine horizon"):
        train(load_config(None, common + ["train.max_steps=4"]))
    with pytest.raises(ConfigError, match="parallel.backend"):
        train(load_config(None, common + ["parallel.backend=fsdp2"]))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(load_config(None, common + ["model.vocab_size=100", "train.run_name=small_vocab"]))
    # AGD has no schedule: a killed AGD run may be extended
    agd = tiny_overrides + ["train.max_steps=2", "train.ckpt_interval=1", "train.run_name=extended"]
    train(load_config(None, agd))
    (Path(tiny_overrides[-1].split("=", 1)[1]) / "extended" / "DONE").unlink()
    assert train(load_config(None, agd + ["train.max_steps=3"]))["step"] == 3
