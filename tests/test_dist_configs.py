"""One-process checks of the distributed plumbing: the ZeRO JSON templates in launch/ are
exactly what the DeepSpeed backend generates, the generated AGD config has what AGD needs,
and the backend refuses an engine that would silently change eta."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agdlm.config import load_config
from agdlm.parallel.deepspeed import DeepSpeedBackend, deepspeed_config

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


GPT2_124M = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024"]  # ZeRO-3 sizes follow it


def cfg_for(optim: str, stage: int, extra=()):
    return load_config(None, [f"optim.name={optim}", "parallel.backend=deepspeed", f"parallel.zero_stage={stage}",
                              "train.global_batch_size=512", "train.micro_batch_size=16", *GPT2_124M, *extra])


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("optim", ["agd", "adamw"])
def test_launch_templates_are_the_generated_configs(stage, optim):
    template = json.loads((LAUNCH / f"zero{stage}_{optim}_bf16.json").read_text())
    assert template == deepspeed_config(cfg_for(optim, stage), world_size=8, precision="bf16")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_agd_config_turns_off_what_changes_eta(stage):
    ds = deepspeed_config(cfg_for("agd", stage), world_size=8, precision="bf16")
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["round_robin_gradients"] is False
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    adamw = deepspeed_config(cfg_for("adamw", stage, ["optim.grad_clip=1.0"]), world_size=8, precision="bf16")
    assert adamw["gradient_clipping"] == 1.0


def fake_backend(clipping=0.0, dtypes=(torch.bfloat16, torch.float32), comm=torch.float32, precision="bf16"):
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.cfg, backend.precision = cfg_for("agd", 2), precision
    backend.engine = SimpleNamespace(gradient_clipping=lambda: clipping, get_data_types=lambda: dtypes,
                                     communication_data_type=comm, optimizer=SimpleNamespace())
    return backend


@pytest.mark.parametrize("kwargs, message", [
    ({"clipping": 1.0}, "gradient_clipping=0"),
    ({"dtypes": (torch.bfloat16, torch.bfloat16)}, "fp32 gradient accumulation"),
    ({"comm": torch.bfloat16}, "fp32 gradient accumulation"),
])  # fmt: skip
def test_agd_refuses_engines_that_change_eta(kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        fake_backend(**kwargs)._bind_agd(SimpleNamespace(params=[], bind=lambda b: None))


def test_agd_binding_refuses_round_robin_and_several_groups():
    from agdlm.parallel.bindings import DeepSpeedZeroBinding

    flat = torch.zeros(4)
    with pytest.raises(RuntimeError, match="round_robin"):
        DeepSpeedZeroBinding([], SimpleNamespace(single_partition_of_fp32_groups=[flat], real_dp_process_group=[None],
                                                 round_robin_gradients=True))
    with pytest.raises(RuntimeError, match="ONE param group"):
        DeepSpeedZeroBinding([], SimpleNamespace(single_partition_of_fp32_groups=[flat, flat], real_dp_process_group=[None]))
