"""Worker for tests/test_dist_backends.py: one 2-rank gloo process group that runs every
backend case against the single-process reference and writes the results (rank 0) to JSON.

Each case: the tiny GPT (biases, LayerNorm affine) trained 3 steps on the same global
batches (8 rows; 2 ranks x 2 micro-batches of 2 rows) by the backend, weights gathered and
compared with the single-process run (8 rows, one micro-batch); a checkpoint written after
step 2 is loaded by a fresh backend, which repeats step 3 and must land on the same weights.
On FSDP2 the collectives of the step are counted."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from agdlm.config import load_config
from agdlm.model import GPT
from agdlm.optim.registry import kind_of
from agdlm.parallel import build_backend
from agdlm.parallel.env import DistEnv
from agdlm.train import make_optimizer_factory
from gloo_workers import join_group, run_cases, spawn

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.vocab_size=128",
    "model.bias=true", "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=fp32",
    "train.device=cpu", "optim.lr=1e-2", "optim.warmup_steps=1", "optim.weight_decay=0.1",
    # AdamW divides by sqrt(v) + eps: with eps=1e-8 it turns float rounding noise in gradients
    # that are exactly zero in exact arithmetic (the key bias: softmax is shift-invariant) into
    # +-lr steps, so no two summation orders agree; a larger eps keeps the comparison sharp.
    "optim.eps=1e-3",
]  # fmt: skip
STEPS, ROWS = 3, 8

# name -> overrides
CASES = {
    "ddp-agd": ["parallel.backend=ddp", "optim.name=agd"],
    "ddp-agd-spectral_momentum": ["parallel.backend=ddp", "optim.name=agd", "optim.variant=spectral_momentum"],
    "ddp-adamw": ["parallel.backend=ddp", "optim.name=adamw", "model.activation_checkpointing=true"],
    "fsdp2-agd": ["parallel.backend=fsdp2", "optim.name=agd"],
    "fsdp2-adamw": ["parallel.backend=fsdp2", "optim.name=adamw"],
    "fsdp2-adamw-noclip": ["parallel.backend=fsdp2", "optim.name=adamw", "optim.grad_clip=0"],
    "fsdp2-agd-unsharded-accum": ["parallel.backend=fsdp2", "optim.name=agd", "parallel.fsdp_reshard_grads=false"],
    "fsdp2-adamw-unsharded-accum": ["parallel.backend=fsdp2", "optim.name=adamw", "parallel.fsdp_reshard_grads=false"],
    "hsdp2x1-agd": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=agd"],
    "hsdp2x1-adamw": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=adamw"],
    "fsdp2-agd-modular-untied-ac": ["parallel.backend=fsdp2", "optim.name=agd", "optim.policy=modular",
                                    "model.tie_embeddings=false", "model.activation_checkpointing=true"],
    "zero1-agd": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "optim.name=agd"],
    "zero1-adamw": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "optim.name=adamw"],
    "zero2-agd": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd"],
    "zero2-adamw": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=adamw"],
    "zero3-agd": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd"],
    "zero3-adamw": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=adamw"],
    "zero2-agd-modular-untied": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd",
                                 "optim.policy=modular", "model.tie_embeddings=false"],
    "fsdp2-agd-spectral": ["parallel.backend=fsdp2", "optim.name=agd", "optim.variant=spectral"],
    "hsdp2x1-agd-spectral-modular": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=agd",
                                     "optim.variant=spectral", "optim.policy=modular"],
    "zero1-agd-spectral": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "optim.name=agd",
                           "optim.variant=spectral"],
    "zero2-agd-spectral": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd",
                           "optim.variant=spectral"],
    "zero3-agd-spectral": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd",
                           "optim.variant=spectral"],
    # momentum buffers: DTensors on FSDP2 (DCP), the flat partition's shape on ZeRO (engine state)
    "fsdp2-agd-spectral_momentum": ["parallel.backend=fsdp2", "optim.name=agd", "optim.variant=spectral_momentum"],
    "hsdp2x1-agd-momentum": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=agd",
                             "optim.variant=momentum"],
    "zero1-agd-momentum": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "optim.name=agd",
                           "optim.variant=momentum"],
    "zero2-agd-spectral_momentum": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd",
                                    "optim.variant=spectral_momentum"],
    "zero3-agd-spectral_momentum": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd",
                                    "optim.variant=spectral_momentum"],
    # optim.compile: the step's scales and updates through torch.compile on sharded pieces
    "fsdp2-agd-compile": ["parallel.backend=fsdp2", "optim.name=agd", "optim.compile=true"],
    "zero2-agd-compile": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd", "optim.compile=true"],
    "zero3-agd-compile": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd", "optim.compile=true"],
    "zero3-agd-modular-untied-ac": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd",
                                    "optim.policy=modular", "model.tie_embeddings=false",
                                    "model.activation_checkpointing=true"],
    # the baselines where they are correct (agdlm.optim.registry refuses the others)
    "fsdp2-agd-spectral_momentum_rows": ["parallel.backend=fsdp2", "optim.name=agd",
                                         "optim.variant=spectral_momentum_rows", "model.tie_embeddings=false"],
    "zero3-agd-spectral_momentum_rows": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd",
                                         "optim.variant=spectral_momentum_rows"],
    # bf16 Newton-Schulz (the accelerator path, forced on the CPU here): the exchange carries bf16
    "fsdp2-agd-spectral_momentum-bf16": ["parallel.backend=fsdp2", "optim.name=agd", "optim.variant=spectral_momentum"],
    "ddp-muon": ["parallel.backend=ddp", "optim.name=muon"],
    "fsdp2-muon": ["parallel.backend=fsdp2", "optim.name=muon"],
    "hsdp2x1-muon": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=muon"],
    "ddp-prodigy": ["parallel.backend=ddp", "optim.name=prodigy", "optim.lr=1.0"],
    "ddp-schedulefree": ["parallel.backend=ddp", "optim.name=schedulefree"],
}  # fmt: skip

class CollectiveCounter:
    """Counts the collectives issued in the real process, at the dispatcher: the profiler
    records every c10d op (`c10d::allreduce_`, `c10d::_allgather_base_`,
    `c10d::_reduce_scatter_base_`, functional `_c10d_functional::*`) whoever calls it.
    `take()` returns the counts since the previous `take()`."""

    def __init__(self):
        self._start()

    def _start(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()

    def take(self) -> dict[str, int]:
        self.prof.__exit__(None, None, None)
        counts: dict[str, int] = {}
        for e in self.prof.events():
            if e.name.startswith(("c10d::", "_c10d_functional::")) and "wait" not in e.name:
                counts[e.name] = counts.get(e.name, 0) + 1
        self._start()
        return counts

    def remove(self) -> None:
        self.prof.__exit__(None, None, None)


def global_batch(k: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    data = torch.randint(0, cfg.model.vocab_size, (ROWS, cfg.model.block_size + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def initial_weights(cfg) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    kind_of(cfg.optim.name).init_weights(model, cfg.optim)  # AGD's init; the others keep GPT's
    return {k: v.clone() for k, v in model.state_dict().items()}


def build(cfg, env, init):
    model = GPT(cfg.model)
    model.load_state_dict(init)
    backend = build_backend(cfg, env)
    backend.setup(model, make_optimizer_factory(cfg, "cpu"))
    return backend


def train_step(backend, cfg, env, k: int, counter: CollectiveCounter | None = None) -> dict:
    kind = kind_of(cfg.optim.name)
    kind.set_lr(backend.optimizer, k, cfg.optim, STEPS)
    x, y = global_batch(k, cfg)
    rows = ROWS // env.world_size
    x, y = x[env.rank * rows : (env.rank + 1) * rows], y[env.rank * rows : (env.rank + 1) * rows]
    micro = list(zip(x.split(cfg.train.micro_batch_size), y.split(cfg.train.micro_batch_size)))
    for i, (xb, yb) in enumerate(micro):
        backend.forward_backward(xb, yb, len(micro), i == len(micro) - 1)
    counts = {"backward": counter.take()} if counter else {}
    backend.optimizer_step(kind.grad_clip(cfg.optim))
    if counter:
        counts["step"] = counter.take()
    return counts


def reference(cfg, init) -> dict:
    """The single-process run: backend single, one micro-batch of the whole global batch."""
    ref_cfg = load_config(None, [*TINY, *CASE_OVERRIDES, "parallel.backend=single", "parallel.replicate=1",
                                 f"train.micro_batch_size={ROWS}"])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    backend = build(ref_cfg, env, init)
    for k in range(STEPS):
        train_step(backend, ref_cfg, env, k)
    return backend.full_state_dict(), optimizer_scalars(backend.optimizer)


def optimizer_scalars(optimizer) -> dict:
    """The step-size state an optimiser keeps in its first group (Prodigy's d, schedule-free's
    weight sum): sums over every parameter, so a shard's partial sum would show here."""
    group = optimizer.param_groups[0]
    return {k: float(group[k]) for k in ("d", "d_max", "d_numerator", "weight_sum", "lr_max") if k in group}


def rel_errs(a: dict, b: dict) -> dict[str, float]:
    """Per tensor: max |a - b| / max |b|."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return {k: float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)) for k in b}


def max_rel_err(a: dict, b: dict) -> float:
    return max(rel_errs(a, b).values())


CASE_OVERRIDES: list[str] = []


def run_case(name: str, overrides: list[str], env: DistEnv, tmp: Path) -> dict:
    from agdlm.optim import agd

    cfg = load_config(None, [*TINY, *overrides])
    # optim.compile: every piece through the compiled per-tensor update (this tiny model's
    # shards would otherwise all share the eager small-piece flat buffer), compiled afresh
    # for this case, so its graph count says that this case's steps ran compiled
    limit, ns_dtype = agd.FLAT_MAX_NUMEL["cpu"], agd.newton_schulz_dtype
    agd.FLAT_MAX_NUMEL["cpu"] = 1 if cfg.optim.compile else limit
    if cfg.optim.compile:
        torch._dynamo.reset()
    if name.endswith("-bf16"):  # the case and its single-process reference
        agd.newton_schulz_dtype = lambda device: torch.bfloat16
    try:
        return run_case_in(name, cfg, overrides, env, tmp)
    finally:
        agd.FLAT_MAX_NUMEL["cpu"], agd.newton_schulz_dtype = limit, ns_dtype


def run_case_in(name: str, cfg, overrides: list[str], env: DistEnv, tmp: Path) -> dict:
    global CASE_OVERRIDES
    CASE_OVERRIDES = overrides
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    init = initial_weights(cfg)
    counter = CollectiveCounter() if cfg.parallel.backend == "fsdp2" else None
    try:
        backend = build(cfg, env, init)
        folder = tmp / name
        counts = []
        for k in range(STEPS):
            if k == STEPS - 1:
                if env.is_main:
                    folder.mkdir(parents=True, exist_ok=True)
                env.barrier()
                if counter:
                    counter.take()
                before_save = {k: v.clone() for k, v in backend.full_state_dict().items()}  # .cpu() may alias
                backend.save(folder)
                env.barrier()
                if counter:
                    counter.take()
            counts.append(train_step(backend, cfg, env, k, counter))
    finally:
        if counter:
            counter.remove()
    if cfg.optim.name == "agd":
        metrics = backend.optimizer.log_metrics()  # a collective on sharded bindings: all ranks
        compiled = [backend.optimizer.compiled, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs]
    full = backend.full_state_dict()
    scalars = optimizer_scalars(backend.optimizer)
    del backend
    resumed = build(cfg, env, initial_weights(load_config(None, [*TINY, *overrides, "optim.name=adamw"])))  # other init
    resumed.load(folder)
    train_step(resumed, cfg, env, STEPS - 1)
    full_resumed = resumed.full_state_dict()
    del resumed
    result: dict = {}
    if env.is_main:
        from agdlm.export import consolidated_state_dict

        ref, ref_scalars = reference(cfg, init)
        result = {
            "export_rel_err": max_rel_err(consolidated_state_dict(folder, cfg.model), before_save),
            "rel_err": max_rel_err(full, ref),
            "worst": sorted(rel_errs(full, ref).items(), key=lambda kv: -kv[1])[:3],
            "errs": rel_errs(full, ref),
            "resume_rel_err": max_rel_err(full_resumed, full),
            "moved": max_rel_err(init, ref),
            "moved_least": min(rel_errs(init, ref).values()),  # every tensor moved, not just one bias
            "collectives": counts,
            # the step itself (weights after - before), against the reference's: an optimiser
            # that moves the weights little (Prodigy's first steps) is compared where it acts
            "update_rel_err": max_rel_err({k: full[k] - init[k] for k in ref}, {k: ref[k] - init[k] for k in ref}),
            "update_cos_min": min(float(torch.nn.functional.cosine_similarity(
                (full[k] - init[k]).float().flatten(), (ref[k] - init[k]).float().flatten(), dim=0)) for k in ref),
            "scalars": scalars,
            "ref_scalars": ref_scalars,
        }
        if cfg.optim.name == "agd":
            result["agd_eta"] = metrics["agd_eta"]
            result["compiled"] = compiled  # the flag, and the graphs its 3 steps compiled
    env.barrier()
    return result


def worker(rank: int, world_size: int, port: int, out: str, only: list[str] | None) -> None:
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # optim.compile cases: never a silent eager fallback
    env = join_group(rank, world_size, port)
    tmp = Path(out).parent / "ckpt"
    cases = {name: o for name, o in CASES.items() if not only or name in only}
    run_cases(env, out, cases, lambda name, overrides: run_case(name, overrides, env, tmp))


def main() -> None:
    spawn(worker, 2, sys.argv[1], sys.argv[2:] or None)


if __name__ == "__main__":
    main()
