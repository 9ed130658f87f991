"""torch.optim.Muon on FSDP2 shards: its own update (momentum, Nesterov, weight decay, the
lr adjustment) on each rank's rows, and its own Newton-Schulz (torch's private
`_zeropower_via_newtonschulz`, not a copy) on each WHOLE matrix, run once by an owner rank
through agdlm.parallel.owners.OwnerExchange. torch's Newton-Schulz casts its input to bf16
first, so the exchange carries bf16 both ways and changes nothing against one process."""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from agdlm.parallel.owners import OwnerExchange, newton_schulz_cost


class ShardedMuon(torch.optim.Muon):
    """Muon over DTensor (Shard(0)) matrices; the backend binds it to its shard group
    (`bind`, as it binds AGD), before the first step."""

    def __init__(self, params, **kwargs):
        self.params = list(params)
        super().__init__(self.params, **kwargs)
        self.binding = None
        self._exchange = None

    def bind(self, binding) -> None:
        self.binding = binding  # agdlm.parallel.bindings.FSDP2Binding: this rank's flat offsets

    def _owner_exchange(self) -> OwnerExchange:
        if self._exchange is None:
            if self.binding is None:
                raise RuntimeError("ShardedMuon: not bound to a shard group (the FSDP2 backend binds it)")
            sizes = [p.numel() for p in self.params]
            costs = [newton_schulz_cost(*p.shape) for p in self.params]
            local = [(i, self.binding.starts[i], p._local_tensor.numel()) for i, p in enumerate(self.params)
                     if p._local_tensor.numel() > 0]
            self._exchange = OwnerExchange(self.binding.group, sizes, [[i] for i in range(len(sizes))], costs, local)
        return self._exchange

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        (group,) = self.param_groups  # one group: the hidden matrices
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        index = {id(p): i for i, p in enumerate(self.params)}
        updates, held = {}, []
        for p in group["params"]:
            if p.grad is None:
                raise RuntimeError("ShardedMuon: a matrix without gradient (every rank must exchange every matrix)")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            g, buf = p.grad._local_tensor, state["momentum_buffer"]._local_tensor
            buf.lerp_(g, 1 - momentum)
            updates[index[id(p)]] = g.lerp(buf, momentum) if group["nesterov"] else buf
            if g.numel():
                held.append(index[id(p)])
        exchange = self._owner_exchange()

        def orthogonalise(owned: dict) -> dict:
            return {i: [_zeropower_via_newtonschulz(regions[0].view(self.params[i].shape), group["ns_coefficients"],
                                                    group["ns_steps"], group["eps"])]
                    for i, regions in owned.items()}

        device = self.params[0]._local_tensor.device
        directions = exchange.run([updates[i] for i in held], orthogonalise, torch.bfloat16, device)
        for i, o in zip(held, directions):
            p = self.params[i]._local_tensor
            p.mul_(1 - lr * wd)
            p.add_(o.view_as(p), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], self.params[i].shape))
        return loss
