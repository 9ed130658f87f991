"""A tiny GPT trained by AGD (default policy, init_weights, no tuning) on the demo corpus."""

from __future__ import annotations

import time

import torch

from agdlm.config import load_config
from agdlm.data import build_data
from agdlm.model import GPT
from agdlm.optim import AGD


@torch.no_grad()
def val_loss(model, data, k=2):
    model.eval()
    losses = [float(model(x, y)[1]) for i in range(k) for x, y in data.val.batch(i)]
    model.train()
    return sum(losses) / len(losses)


def test_tiny_gpt_val_loss_falls_one_nat():
    t0 = time.time()
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                             "train.global_batch_size=8", "train.micro_batch_size=8"])
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    model = GPT(cfg.model)
    opt = AGD(model, policy="default")
    opt.init_weights()
    before = val_loss(model, data)
    for _ in range(60):
        micro = data.train.next_batch()
        model.zero_grad(set_to_none=True)
        for x, y in micro:
            (model(x, y)[1] / len(micro)).backward()
        opt.step()
    after = val_loss(model, data)
    print(f"val loss {before:.3f} -> {after:.3f} in {time.time() - t0:.1f}s, metrics {opt.log_metrics()}")
    assert before - after >= 1.0, (before, after)
