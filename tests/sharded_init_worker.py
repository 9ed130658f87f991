"""Run by tests/test_sharded_init.py: `python sharded_init_worker.py OUT.json WORLD_SIZE`.
One gloo process group of WORLD_SIZE ranks builds every case the way `agdlm train` starts a
fresh FSDP2 / ZeRO-3 run (meta device, sharded init) and compares, on rank 0, the gathered
weights with one process's init from the same seed (bitwise), and the weights after one
training step with the same step from a backend given those weights whole (the old path)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import TINY, global_batch  # noqa: E402

from agdlm.config import load_config  # noqa: E402
from agdlm.model import GPT  # noqa: E402
from agdlm.parallel.env import DistEnv  # noqa: E402
from gloo_workers import join_group, run_cases, spawn  # noqa: E402
from agdlm.train import build_model_and_backend, default_initial_weights, make_optimizer_factory  # noqa: E402
from agdlm.parallel import build_backend  # noqa: E402

SEED = 7
CASES = {
    "fsdp2-agd": ["parallel.backend=fsdp2", "optim.name=agd"],
    "fsdp2-adamw": ["parallel.backend=fsdp2", "optim.name=adamw"],
    "fsdp2-agd-modular-untied-nobias": ["parallel.backend=fsdp2", "optim.name=agd", "optim.policy=modular",
                                        "model.tie_embeddings=false", "model.bias=false"],
    "hsdp-agd": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=agd"],
    "zero3-agd": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd"],
    "zero3-adamw": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=adamw"],
    "zero3-agd-modular-untied": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd",
                                 "optim.policy=modular", "model.tie_embeddings=false"],
}  # fmt: skip


def single_process_init(cfg) -> dict:
    torch.manual_seed(SEED)
    model = GPT(cfg.model)
    default_initial_weights(cfg)(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def one_step(backend, cfg, env) -> dict:
    x, y = global_batch(0, cfg)
    rows = cfg.train.global_batch_size // env.world_size
    xs, ys = x[env.rank * rows : (env.rank + 1) * rows], y[env.rank * rows : (env.rank + 1) * rows]
    micro = list(zip(xs.split(cfg.train.micro_batch_size), ys.split(cfg.train.micro_batch_size)))
    for i, (xb, yb) in enumerate(micro):
        backend.forward_backward(xb, yb, len(micro), i == len(micro) - 1)
    backend.optimizer_step(cfg.optim.grad_clip if cfg.optim.name == "adamw" else 0.0)
    return {k: v.clone() for k, v in backend.full_state_dict().items()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def run_case(overrides: list[str], env: DistEnv) -> dict:
    micro = 8 // env.world_size  # 3 ranks: a global batch of 6 rows
    cfg = load_config(None, [*TINY, *overrides, f"train.micro_batch_size={micro}",
                             f"train.global_batch_size={micro * env.world_size}"])
    reference = single_process_init(cfg)
    torch.manual_seed(SEED + env.rank)  # as the trainer seeds: rank 0's stream is the one that counts
    sharded = build_model_and_backend(cfg, env, fresh=True)
    initial = {k: v.clone() for k, v in sharded.full_state_dict().items()}
    raw = sharded.raw_model
    tied = raw.lm_head.weight is raw.transformer.wte.weight
    after = one_step(sharded, cfg, env)
    del sharded
    whole = GPT(cfg.model)
    whole.load_state_dict(reference)
    old_path = build_backend(cfg, env)
    old_path.setup(whole, make_optimizer_factory(cfg, "cpu"))
    after_old = one_step(old_path, cfg, env)
    del old_path
    if not env.is_main:
        return {}  # full_state_dict gathers onto rank 0
    return {
        "init_bitwise": all(torch.equal(initial[k], reference[k]) for k in reference),
        "init_max_abs_diff": max_abs_diff(initial, reference),
        "step_max_abs_diff": max_abs_diff(after, after_old),
        "moved": max_abs_diff(after_old, reference),
        "tied": tied,
    }


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    import logging
    import warnings

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    env = join_group(rank, world_size, port)
    cases = {name: o for name, o in CASES.items() if "parallel.replicate=2" not in o or world_size == 2}
    run_cases(env, out, cases, lambda name, overrides: run_case(overrides, env))


def main() -> None:
    spawn(worker, int(sys.argv[2]), sys.argv[1])


if __name__ == "__main__":
    main()
