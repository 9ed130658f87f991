"""What the optimiser-step benchmarks share: the parameter sets, a GPT holding random gradients,
and interleaved timing (each step once per round, so all see the same machine state; medians)."""

from __future__ import annotations

import statistics
import time

import torch

CASES = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True),
    "48x64": dict(n_layer=48, n_head=1, n_embd=64, block_size=1024, bias=False),
    "48x64-bias": dict(n_layer=48, n_head=1, n_embd=64, block_size=1024, bias=True),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, bias=True),  # GPU only (~25 GB; --compile ~37)
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, device, warmup: int, repeats: int) -> dict[str, float]:
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def model_with_random_grads(shapes: dict, device) -> torch.nn.Module:
    """A GPT of these shapes (vocab 50,304) whose every parameter holds a random gradient."""
    from agdlm.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50304, **shapes)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model
