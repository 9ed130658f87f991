"""Policies: which norm, target size s and depth weight every trainable tensor gets.

Roles come from module TYPES and their position in the model (an nn.Linear that is the
`c_attn` attribute of a CausalSelfAttention, the `wte` of a GPT's transformer, any
nn.LayerNorm, ...), never from name patterns. A tensor that no rule covers raises an error
naming it. See AGD_SPEC.md section 3 for the tables implemented here.

Roles: attn_qkv, attn_proj, mlp_fc, mlp_proj, wte_head (tied token embedding = head),
wte, head, wpe, ln_gain, ln_bias, and for modules outside a GPT: linear, embedding.
"""

from __future__ import annotations

import math
import warnings

import torch.nn as nn

from agdlm.optim.plan import Component, Layer, LayerPlan, Part

POLICIES = ("default", "paper", "agd_exp", "modular")


class RuleError(ValueError):
    """No rule (or a refused rule) for a named tensor."""


def _find(model: nn.Module, cls_name: str):
    from agdlm import model as gpt_module

    cls = getattr(gpt_module, cls_name)
    return [m for m in model.modules() if isinstance(m, cls)]


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, nn.Module | None]]]:
    """id(param) -> [(module name, module, attribute, parent module)] over every module
    that holds it (a tied weight has several)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, list] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        parent = modules.get(mname.rsplit(".", 1)[0] if "." in mname else "", None) if mname else None
        for attr, p in m._parameters.items():
            if p is not None:
                entry = (mname, m, attr, parent)
                lst = owners.setdefault(id(p), [])
                if all(e[1] is not m or e[2] != attr for e in lst):
                    lst.append(entry)
    return owners


def _classify(entry, gpts) -> str:
    """The role key of one (module, attribute) holding a tensor, or '' if none applies."""
    from agdlm.model import MLP, CausalSelfAttention

    mname, m, attr, parent = entry
    if isinstance(m, nn.LayerNorm):
        return {"weight": "ln_gain", "bias": "ln_bias"}.get(attr, "")
    for g in gpts:
        if m is g.lm_head:
            return "head" if attr == "weight" else ""
        if m is g.transformer.wte:
            return "wte" if attr == "weight" else ""
        if m is g.transformer.wpe:
            return "wpe" if attr == "weight" else ""
    if isinstance(m, nn.Linear) and attr in ("weight", "bias"):
        if isinstance(parent, CausalSelfAttention):
            if parent.c_attn is m:
                return "attn_qkv"
            if parent.c_proj is m:
                return "attn_proj"
        if isinstance(parent, MLP):
            if parent.c_fc is m:
                return "mlp_fc"
            if parent.c_proj is m:
                return "mlp_proj"
        return "linear"
    if isinstance(m, nn.Embedding) and attr == "weight":
        return "embedding"
    return ""


def build_plan(model: nn.Module, policy: str) -> tuple[list[nn.Parameter], list[str], LayerPlan]:
    if policy not in POLICIES:
        raise ValueError(f"AGD policy {policy!r} is unknown (choose one of: {', '.join(POLICIES)})")
    params, names, seen = [], [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
            names.append(name)
    if not params:
        raise ValueError("AGD: the model has no trainable parameters")
    owners = _owners(model)
    gpts = _find(model, "GPT")
    n_layer = gpts[0].config.n_layer if gpts else max(1, len(_find(model, "CausalSelfAttention")))
    builder = _Builder(params, names, policy, n_layer)

    # role of every tensor
    roles: list[str] = []
    for i, (name, p) in enumerate(zip(names, params)):
        found = sorted({_classify(e, gpts) for e in owners[id(p)]})
        if len(owners[id(p)]) > 1:
            if policy == "paper":
                holders = ", ".join(e[0] or "<root>" for e in owners[id(p)])
                raise RuleError(f"AGD policy 'paper' refuses tied weight {name!r} (shared by {holders}): "
                                "Algorithm 1 has one layer per weight")
            if found != ["head", "wte"]:
                holders = ", ".join(e[0] or "<root>" for e in owners[id(p)])
                raise RuleError(f"AGD: no rule for tensor {name!r} shared by {holders} "
                                "(only a GPT's wte/lm_head tie is supported)")
            roles.append("wte_head")
            continue
        role = found[0] if found else ""
        if policy == "paper" and p.dim() == 1:
            raise RuleError(f"AGD policy 'paper' refuses 1-D tensor {name!r} (shape {tuple(p.shape)}): "
                            "Algorithm 1 has only bias-free matrices; use policy 'default'")
        if not role:
            m = owners[id(p)][0][1]
            raise RuleError(f"AGD: no rule for tensor {name!r} (shape {tuple(p.shape)}, held by "
                            f"{type(m).__name__}); policies cover nn.Linear, nn.Embedding, nn.LayerNorm "
                            "and a GPT's parts")
        if policy == "paper" and not (role in ("linear", "attn_qkv", "attn_proj", "mlp_fc", "mlp_proj", "head")
                                      and p.dim() == 2):
            raise RuleError(f"AGD policy 'paper' has no rule for tensor {name!r} ({role}): it covers "
                            "nn.Linear weights only")
        roles.append(role)

    # weights (and 2-D tensors) first so that biases and LN biases can join their layer
    builder.tied = "wte_head" in roles
    module_of = {i: owners[id(p)][0][1] for i, p in enumerate(params)}
    index_of = {id(p): i for i, p in enumerate(params)}
    for i, role in enumerate(roles):
        if role in ("ln_gain", "ln_bias") or params[i].dim() == 1:
            continue
        builder.matrix(i, role)
    for i, role in enumerate(roles):
        if role == "ln_gain":
            m = module_of[i]
            bias_i = index_of.get(id(m.bias)) if getattr(m, "bias", None) is not None else None
            builder.layernorm(i, bias_i)
    for i, role in enumerate(roles):
        p = params[i]
        if role == "ln_bias":
            m = module_of[i]
            if m.weight is None or id(m.weight) not in index_of:  # gain absent or frozen
                builder.layernorm(None, i)
            continue
        if p.dim() == 1 and role not in ("ln_gain",):
            m = module_of[i]
            w = getattr(m, "weight", None)
            if w is None or id(w) not in index_of:
                raise RuleError(f"AGD: no rule for bias {names[i]!r}: its module has no trainable weight")
            builder.bias(i, index_of[id(w)])
    if builder.frozen and policy == "agd_exp":
        warnings.warn("AGD policy 'agd_exp' freezes LayerNorm parameters (their gradients are ignored): "
                      + ", ".join(builder.frozen), stacklevel=3)
    return params, names, LayerPlan(builder.components, builder.layers)


class _Builder:
    def __init__(self, params, names, policy, n_layer):
        self.params, self.names, self.policy, self.n = params, names, policy, n_layer
        self.components: list[Component] = []
        self.layers: list[Layer] = []
        self.weight_comps: dict[int, list[int]] = {}  # param index -> its components (rows blocks)
        self.frozen: list[str] = []
        self.tied = False

    def _layer(self, name, role, in_L) -> int:
        self.layers.append(Layer(name, role, float(in_L)))
        return len(self.layers) - 1

    def _comp(self, comp: Component) -> int:
        self.components.append(comp)
        return len(self.components) - 1

    def _whole(self, i, part, init, scale=1.0) -> Part:
        p = self.params[i]
        return Part(i, 0, p.numel(), self.names[i], part, tuple(p.shape), init, scale)

    def matrix(self, i: int, role: str) -> None:
        p, name = self.params[i], self.names[i]
        if p.dim() != 2:
            raise RuleError(f"AGD: no rule for {p.dim()}-D tensor {name!r} (role {role}); rules cover matrices")
        d_out, d_in = p.shape
        ratio = math.sqrt(d_out / d_in)
        pol, n = self.policy, self.n
        if role == "attn_qkv" and pol == "modular":
            d = d_out // 3
            ids = []
            for k, blk in enumerate("qkv"):
                li = self._layer(f"{name}[{blk}]", role, 1)
                part = Part(i, k * d * d_in, (k + 1) * d * d_in, name, blk, (d, d_in), "orthogonal", 1.0)
                ids.append(self._comp(Component("frobenius", 1.0, role, li, [part])))
            self.weight_comps[i] = ids
            return
        rows_rule = pol == "modular" and role in ("wte", "wpe", "embedding")
        if role == "wpe" and pol == "modular" and self.tied:
            s, norm, init, scale = 1.0 / math.sqrt(d_in), "rows", "rows", 1.0  # rows of norm 1
        elif rows_rule:
            s, norm, init, scale = 1.0, "rows", "rows", math.sqrt(d_in)  # rows of RMS 1
        else:
            if pol == "paper":
                s = ratio  # Algorithm 1: sqrt(d_out / d_in) for every nn.Linear
            elif role == "attn_qkv":
                s = ratio / math.sqrt(3)
            elif role in ("attn_proj", "mlp_proj"):
                s = ratio / math.sqrt(2 * n if pol == "modular" else n)
            else:
                s = ratio
            norm, init, scale = "frobenius", "orthogonal", s
        in_L = 3 if (role == "attn_qkv" and pol != "paper") else 1
        li = self._layer(name, role, in_L)
        comp = Component(norm, s, role, li, [self._whole(i, "weight", init, scale)], dim=d_in)
        self.weight_comps[i] = [self._comp(comp)]

    def bias(self, i: int, w_index: int) -> None:
        comps = self.weight_comps.get(w_index)
        if not comps:
            raise RuleError(f"AGD: no rule for bias {self.names[i]!r}: its weight has no matrix rule")
        b = self.params[i]
        d_in = self.params[w_index].shape[1]
        blocks = len(comps)
        d = b.numel() // blocks
        for k, ci in enumerate(comps):
            c = self.components[ci]
            label = "bias" if blocks == 1 else f"{c.parts[0].part}.bias"
            part = Part(i, k * d, (k + 1) * d, self.names[i], label, (d,), "zeros")
            if self.policy == "agd_exp":
                self._comp(Component("follow", c.s, c.role, c.layer, [part], leader=ci))
            else:
                if c.norm != "frobenius":
                    raise RuleError(f"AGD: bias {self.names[i]!r} joins a {c.norm} layer; no rule")
                c.parts.append(part)
                c.s = c.s * math.sqrt(d_in / (d_in + 1))  # s_aug for the pair [W|b]

    def layernorm(self, gain_i: int | None, bias_i: int | None) -> None:
        name = self.names[gain_i if gain_i is not None else bias_i].rsplit(".", 1)[0]
        if self.policy == "agd_exp":
            li = self._layer(name, "ln_gain" if gain_i is not None else "ln_bias", 0)
            for i, role, init in ((gain_i, "ln_gain", "ones"), (bias_i, "ln_bias", "zeros")):
                if i is not None:
                    self._comp(Component("frozen", 0.0, role, li, [self._whole(i, "weight" if role == "ln_gain" else "bias", init)]))
                    self.frozen.append(self.names[i])
            return
        li = self._layer(name, "ln_gain" if gain_i is not None else "ln_bias", 1)
        if gain_i is not None:
            self._comp(Component("sign", 1.0, "ln_gain", li, [self._whole(gain_i, "weight", "ones")]))
        if bias_i is not None:
            d = self.params[bias_i].numel()
            self._comp(Component("rms", 1.0, "ln_bias", li, [self._whole(bias_i, "bias", "zeros")], dim=d))
