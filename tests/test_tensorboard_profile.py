"""log.tensorboard writes metrics.jsonl's scalars against tokens seen (read back with
TensorBoard's own EventAccumulator); train.profile leaves a Chrome trace naming the
optimiser step."""

import json
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from agdlm.config import load_config  # noqa: E402
from agdlm.train import train  # noqa: E402


def test_tensorboard_scalars_and_profiler_trace(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.max_steps=4", "train.eval_interval=2", "train.ckpt_interval=4",
                                              "log.tensorboard=true", "train.profile={start: 1, steps: 2}",
                                              "train.run_name=tb"])
    run_dir = Path(train(cfg)["run_dir"])

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("train_loss", "val_loss", "agd_eta", "agd_G", "tokens_per_s", "step"):
        expected = [(r["tokens"], r[name]) for r in records if r.get(name) is not None]
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [t for t, _ in logged] == [t for t, _ in expected], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), name
    assert "tokens" not in events.Tags()["scalars"]

    traces = list((run_dir / "profile").glob("*.pt.trace.json"))
    assert [t.name for t in traces] == ["rank0.steps_2-3.pt.trace.json"]
    trace = json.loads(traces[0].read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert names.count("AGD.step") == 2  # steps 2 and 3 recorded, nothing else
