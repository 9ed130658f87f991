"""`agdlm bench optim --optimisers`: one step of every optimiser agdlm offers, built from its
own config file (configs/optim/*.yaml) through the registry exactly as a run builds it, on
GPT-2-124M-shaped parameters with random gradients, against torch's fused AdamW.

Steps are interleaved (each optimiser once per round) so all see the same machine state; the
medians are printed, never asserted. State bytes per parameter: the optimiser's own tensors
(moments, momentum, Prodigy's p0 and s, schedule-free's z) after its first step, over the
parameter count; the weights and gradients are not counted."""

from __future__ import annotations

import torch

from agdlm.bench.step_timing import CASES, model_with_random_grads, sync, time_interleaved

# (label, config files and overrides): what a user gets from `optim/<file>.yaml`
OPTIMISERS = {
    "agd": ["optim/agd.yaml"],
    "agd spectral_momentum": ["optim/agd-spectral-momentum.yaml"],
    "muon": ["optim/muon.yaml"],
    "prodigy": ["optim/prodigy.yaml"],
    "schedulefree": ["optim/schedulefree.yaml"],
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1 and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


def build(label: str, shapes: dict, device: torch.device):
    from agdlm.config import load_config, split_config_items
    from agdlm.optim.registry import kind_of

    cfg = load_config(*split_config_items(OPTIMISERS[label]))
    torch.manual_seed(0)
    model = model_with_random_grads(shapes, device)
    kind = kind_of(cfg.optim.name)
    optimizer = kind.build(model, cfg.optim, device.type)
    kind.set_lr(optimizer, cfg.optim.warmup_steps, cfg.optim, 10 * cfg.optim.warmup_steps)  # past warmup
    return optimizer, sum(p.numel() for p in model.parameters())


def bench_optimisers(case: str, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    shapes = CASES[case]
    torch.manual_seed(0)
    reference = model_with_random_grads(shapes, device)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-4, fused=True)
    steps, built = {"fused AdamW": adamw.step}, {"fused AdamW": (adamw, sum(p.numel() for p in reference.parameters()))}
    for label in OPTIMISERS:
        optimizer, n = build(label, shapes, device)
        steps[label], built[label] = optimizer.step, (optimizer, n)
    for step in steps.values():  # first steps create state and caches
        step()
    sync(device)
    medians = time_interleaved(steps, device, warmup, repeats)
    return [dict(label=label, ms=medians[label] * 1e3, ratio=medians[label] / medians["fused AdamW"],
                 state_bytes_per_param=state_bytes(built[label][0]) / built[label][1]) for label in steps]


def print_optimisers(case: str, device: torch.device, warmup: int, repeats: int) -> None:
    rows = bench_optimisers(case, device, warmup, repeats)
    print(f"\nEvery optimiser's step, {case} shapes, built from configs/optim/*.yaml (medians of {repeats}, interleaved):")
    print(f"{'optimiser':<22} {'step ms':>9} {'vs fused AdamW':>14} {'state bytes/param':>17}")
    for r in rows:
        print(f"{r['label']:<22} {r['ms']:>9.1f} {r['ratio']:>14.2f} {r['state_bytes_per_param']:>17.1f}")
