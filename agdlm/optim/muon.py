"""Muon as the published GPT setups use it: torch.optim.Muon (PyTorch's own) on the hidden
2-D matrices, AdamW on the embeddings, the head and every 1-D tensor.

Declared before any grid run:
- lr: one lr and one weight decay for both groups, through adjust_lr_fn="match_rms_adamw"
  (Moonlight: each matrix's step is scaled by 0.2 * sqrt(max(A, B)) so its update RMS
  matches AdamW's), so Muon is swept over one lr like AdamW, on AdamW's warmup/cosine
  schedule.
- On FSDP2 (and HSDP) each matrix is orthogonalised whole, once, by an owner rank
  (agdlm/optim/muon_sharded.py); DeepSpeed ZeRO is refused.
- The fused c_attn weight is one 3C x C matrix to Muon: torch.optim.Muon takes whole 2-D
  parameters, and splitting q, k, v would need a copy of its update. (modded-nanogpt
  orthogonalises q, k and v separately; this is the plain torch.optim.Muon a researcher
  would reach for.)
- Momentum 0.95 with Nesterov and 5 Newton-Schulz steps: torch.optim.Muon's defaults.
- The AdamW group: the baseline's betas, eps and decay split (decay on embeddings/head)."""

from __future__ import annotations

import torch
import torch.nn as nn

from agdlm.optim.combined import CombinedOptimizer
from agdlm.optim.kind import OptimiserKind, OptimiserRefused, decay_groups

LR_ADJUSTMENT = "match_rms_adamw"


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW); a tied weight counted once."""
    embedding_like = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embedding_like.add(id(head.weight))
    matrices, others, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (matrices if p.dim() == 2 and id(p) not in embedding_like else others).append(p)
    return matrices, others


class MuonKind(OptimiserKind):
    name, step_name, scheduled = "muon", "Muon.step", True
    backends = ("single", "ddp", "fsdp2")  # FSDP2 and HSDP: each matrix whole on an owner (muon_sharded)
    refusal = ("DeepSpeed hands its optimiser flat partitions, and torch.optim.Muon on a partition would "
               "orthogonalise the partition, not the matrix")

    def check(self, cfg) -> None:
        if not hasattr(torch.optim, "Muon"):
            raise OptimiserRefused(f"optim.name=muon needs torch.optim.Muon (torch >= 2.9; this is torch {torch.__version__})")
        super().check(cfg)

    def build(self, model, optim_cfg, device_type):
        matrices, others = split_parameters(model)
        sharded = any(hasattr(p, "device_mesh") for p in matrices)  # FSDP2's DTensors
        if sharded:
            from agdlm.optim.muon_sharded import ShardedMuon

        muon = (ShardedMuon if sharded else torch.optim.Muon)(matrices, lr=optim_cfg.lr,
                                                               weight_decay=optim_cfg.weight_decay,
                                                               adjust_lr_fn=LR_ADJUSTMENT)
        adamw = torch.optim.AdamW(decay_groups(model, optim_cfg.weight_decay, others), lr=optim_cfg.lr,
                                  betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=device_type == "cuda")
        return CombinedOptimizer({"muon": muon, "adamw": adamw})

    def prepare_log_step(self, optimizer) -> None:
        # the matrices before a logged step: their update RMS is measured only on those steps
        optimizer.log_snapshot = [p.detach().clone() for g in optimizer.parts["muon"].param_groups for p in g["params"]]

    def log_metrics(self, optimizer) -> dict:
        record = super().log_metrics(optimizer)
        before = getattr(optimizer, "log_snapshot", None)
        if before:
            params = [p for g in optimizer.parts["muon"].param_groups for p in g["params"]]
            sq = sum(float((p.detach() - b).float().square().sum()) for p, b in zip(params, before))
            record["muon_update_rms"] = (sq / sum(p.numel() for p in params)) ** 0.5
            optimizer.log_snapshot = None
        return record
