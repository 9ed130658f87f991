"""The W&B sink with the real wandb library in offline mode. What was logged is read back
from the run's transaction log (<run_dir>/wandb/offline-run-*/run-<id>.wandb): this wandb
version writes no config.yaml or wandb-summary.json for offline runs, and ships no Python
reader, so the file is decoded here (LevelDB log framing around wandb.proto Records)."""

import json
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from agdlm.config import load_config  # noqa: E402
from agdlm.metrics import WandbSink, build_metrics  # noqa: E402
from agdlm.parallel.env import DistEnv  # noqa: E402
from agdlm.train import Trainer, train  # noqa: E402

import torch  # noqa: E402

BLOCK = 32768
FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", 0xBEE1, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32c (masked), length, type: 1 full, 2 first, 3 middle, 4 last


def read_wandb_records(path: Path, timeout_s: float = 20.0) -> list:
    """The Records of a finished run's log. wandb-core may still be flushing it just after
    run.finish() returns, so wait (briefly) for the closing `exit` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _read_records(Path(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_records(path: Path) -> list:
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size:
        return []
    ident, magic, _version = FILE_HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", FILE_HEADER.size
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:  # block trailer: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        pos += CHUNK_HEADER.size
        chunk, pos = data[pos:pos + length], pos + length
        if pos > len(data):  # still being written
            break
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)


def decode(records):
    """(run record, config dict, history rows, metric definitions, summary dict)."""
    run, config, history, metrics, summary = None, {}, [], [], {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            for item in r.run.config.update:
                config[key_of(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                config[key_of(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({key_of(item): json.loads(item.value_json) for item in r.history.item})
        elif kind == "metric":
            metrics.append(r.metric)
        elif kind == "summary":
            for item in r.summary.update:
                summary[key_of(item)] = json.loads(item.value_json)
    return run, config, history, metrics, summary


def cpu_env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_offline_run_logs_config_provenance_and_records(tiny_overrides):
    common = tiny_overrides + ["optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=1", "train.max_steps=4",
                               "train.eval_interval=2", "train.ckpt_interval=4", "log.interval=2", "log.wandb=offline",
                               "log.group=ladder", "log.tags=[width=w32, optim=adamw]", "train.run_name=wb"]
    cfg = load_config(None, common)
    result = train(cfg)
    run_dir = Path(result["run_dir"])

    run_id = (run_dir / "wandb_id").read_text().strip()
    logs = offline_runs(run_dir)
    assert len(logs) == 1 and logs[0].name == f"run-{run_id}.wandb"  # W&B files under the run dir
    assert not Path("wandb").exists() or not any(Path("wandb").glob(f"*{run_id}*"))
    run, config, history, metrics, summary = decode(read_wandb_records(logs[0]))

    assert run.run_id == run_id and run.display_name == "wb" and run.project == "agdlm"
    assert run.run_group == "ladder" and run.job_type == "adamw" and list(run.tags) == ["width=w32", "optim=adamw"]
    assert config["model"] == cfg.to_dict()["model"] and config["optim"]["lr"] == 3e-3
    assert config["train"]["run_name"] == "wb" and config["log"]["wandb"] == "offline"
    prov = config["provenance"]
    assert prov["world_size"] == 1 and "torch" in prov["packages"] and "git_commit" in prov

    # every metrics.jsonl record went to W&B under the same names, numbers only
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(jsonl)
    for row, rec in zip(history, jsonl):
        assert row["step"] == rec["step"] and row["tokens"] == rec["tokens"]
        for key in ("train_loss", "val_loss", "lr", "tokens_per_s", "step_time_s", "grad_norm"):
            if key in rec:
                assert row[key] == pytest.approx(rec[key]), key
    train_rows = [r for r in history if "train_loss" in r]
    assert {"tokens", "train_loss", "tokens_per_s", "lr", "grad_norm", "mem_rss_gib"} <= set(train_rows[0])
    assert [r["step"] for r in history if "val_loss" in r] == [0, 2, 4]

    # tokens seen is the x-axis of every metric
    steps = {m.glob_name or m.name: m.step_metric for m in metrics}
    assert steps.get("*") == "tokens"
    assert summary["val_loss"]["min"] == pytest.approx(min(r["val_loss"] for r in jsonl if r["kind"] == "eval"))
    assert summary["train_loss"] == pytest.approx(train_rows[-1]["train_loss"])


def test_agd_keys_are_logged(tmp_path):
    """AGD's step size, G, per-role share and relative update size reach W&B (a synthetic
    record through the sink: the names are what the trainer logs from opt.log_metrics())."""
    cfg = load_config(None, ["log.wandb=offline", "train.run_name=agdkeys", f"train.out_dir={tmp_path}"])
    run_dir = tmp_path / "agdkeys"
    run_dir.mkdir()
    sink = WandbSink(cfg, run_dir)
    record = {"step": 10, "tokens": 1280, "kind": "train", "train_loss": 5.0, "tokens_per_s": 100.0,
              "step_time_s": 0.1, "agd_eta": 0.05, "agd_G": 2.5, "agd_grad_norm": 3.0,
              "agd_share/matrix": 0.6, "agd_rel_update/matrix": 0.01, "note": "text is not a metric"}
    sink.log(record)
    sink.log({"step": 10, "tokens": 1280, "kind": "eval", "val_loss": 4.5})
    sink.close()
    run, config, history, _, _ = decode(read_wandb_records(offline_runs(run_dir)[0]))
    assert run.job_type == "agd"
    logged = {k: v for k, v in history[0].items() if not k.startswith("_")}
    assert logged == {k: v for k, v in record.items() if k not in ("kind", "note")}
    assert history[1]["val_loss"] == 4.5 and history[1]["tokens"] == 1280


def test_resumed_run_continues_the_same_wandb_run(tiny_overrides, monkeypatch):
    common = tiny_overrides + ["optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=1", "train.max_steps=4",
                               "train.eval_interval=2", "train.ckpt_interval=2", "log.wandb=offline",
                               "train.run_name=wbresume"]
    original = Trainer.train_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.step == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, common))
    monkeypatch.setattr(Trainer, "train_step", original)
    run_dir = Path(train(load_config(None, common))["run_dir"])

    run_id = (run_dir / "wandb_id").read_text().strip()
    logs = offline_runs(run_dir)
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2  # two offline segments, one W&B run
    first, second = (decode(read_wandb_records(p)) for p in logs)
    assert first[0].run_id == second[0].run_id == run_id
    assert max(r["step"] for r in first[2]) == 2 and [r["step"] for r in second[2] if "val_loss" in r] == [4]


def test_fresh_start_gets_a_new_id_and_ranks_other_than_0_log_nothing(tmp_path):
    cfg = load_config(None, ["log.wandb=offline", "train.run_name=ids", f"train.out_dir={tmp_path}"])
    run_dir = tmp_path / "ids"
    run_dir.mkdir()
    (run_dir / "wandb_id").write_text("oldid123\n")
    other = DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    assert build_metrics(cfg, run_dir, other).sinks == []
    metrics = build_metrics(cfg, run_dir, cpu_env(), resumed=False)
    metrics.close()
    assert (run_dir / "wandb_id").read_text().strip() != "oldid123"
    assert [type(s).__name__ for s in metrics.sinks] == ["ConsoleSink", "JsonlSink", "WandbSink"]


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path, capsys):
    from agdlm.metrics import resolve_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_wandb_mode("online") == "offline"
    assert "no W&B credentials" in capsys.readouterr().err
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("online") == "online"
