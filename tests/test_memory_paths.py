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


def zero3_section(model: list[str], optim: str = "agd") -> dict:
    cfg = load_config(None, [f"optim.name={optim}", "parallel.backend=deepspeed", "parallel.zero_stage=3",
                             "train.global_batch_size=64", "train.micro_batch_size=8", *model])
    return deepspeed_config(cfg, world_size=8, precision="bf16")["zero_optimization"]


@pytest.mark.parametrize("optim", ["agd", "adamw"])
def test_zero3_buckets_and_gather_limits_follow_the_model(optim):
    """One block per bucket, two blocks gathered at most: never DeepSpeed's 5e8-element bucket
    or 1e9-element live/reuse limits, which keep a small model whole on every rank."""
    for n_embd, n_layer in ((1024, 8), (1600, 48)):
        zero = zero3_section([f"model.n_embd={n_embd}", f"model.n_head={n_embd // 64}", f"model.n_layer={n_layer}",
                              "model.bias=true"], optim)
        block = 12 * n_embd**2 + 13 * n_embd
        assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == block
        assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 2 * block
    huge = zero3_section(["model.n_embd=8192", "model.n_head=64"], optim)  # a block past DeepSpeed's defaults
    assert huge["reduce_bucket_size"] == 500_000_000 and huge["stage3_prefetch_bucket_size"] == 50_000_000
    assert "reduce_bucket_size" not in ds_config(optim, 2)["zero_optimization"]
