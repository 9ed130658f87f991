"""One-process checks of the settings that make sharded runs scale (issue 11): the DeepSpeed
config overlaps communication for both optimisers, keeps fp32 reduction and one ZeRO-3
sub-group for AGD only, and skips DeepSpeed's global gradient norm for AGD where DeepSpeed
allows it; FSDP2 reduce-scatters every micro-batch unless parallel.fsdp_reshard_grads=false.
The multi-rank equality of these paths is in tests/test_dist_backends.py (overlap on, and
both FSDP2 accumulation modes) and tests/test_sharded_init.py."""

import pytest

from agdlm.config import load_config
from agdlm.parallel.deepspeed import ONE_SUB_GROUP, deepspeed_config


def ds_config(optim: str, stage: int, precision: str = "bf16") -> dict:
    cfg = load_config(None, [f"optim.name={optim}", "parallel.backend=deepspeed", f"parallel.zero_stage={stage}",
                             "train.global_batch_size=64", "train.micro_batch_size=8"])
    return deepspeed_config(cfg, world_size=8, precision=precision)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("optim", ["agd", "adamw"])
def test_overlap_comm_is_on(stage, optim):
    assert ds_config(optim, stage)["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fp32_reduction_only_for_agd(stage, precision):
    assert ds_config("agd", stage, precision)["communication_data_type"] == "fp32"
    assert "communication_data_type" not in ds_config("adamw", stage, precision)


def test_one_zero3_sub_group_only_for_agd():
    assert ds_config("agd", 3)["zero_optimization"]["sub_group_size"] == ONE_SUB_GROUP
    assert "sub_group_size" not in ds_config("adamw", 3)["zero_optimization"]


@pytest.mark.parametrize("stage, precision, skipped", [
    (1, "fp32", True), (1, "bf16", False),  # ZeRO-1 bf16 + fp32 accumulation is BF16_Optimizer: always a norm
    (2, "fp32", True), (2, "bf16", True), (3, "bf16", False),  # ZeRO-3 has no switch
])  # fmt: skip
def test_agd_skips_deepspeeds_grad_norm_where_allowed(stage, precision, skipped):
    zero = ds_config("agd", stage, precision)["zero_optimization"]
    assert zero.get("compute_grad_norm", True) is (not skipped)
    assert ds_config("adamw", stage, precision)["zero_optimization"].get("compute_grad_norm", True) is True


def test_fsdp2_reshards_gradients_by_default():
    assert load_config(None, []).parallel.fsdp_reshard_grads is True
    assert load_config(None, ["parallel.fsdp_reshard_grads=false"]).parallel.fsdp_reshard_grads is False
