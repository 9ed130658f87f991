"""Automatic Gradient Descent (Bernstein et al. 2023, arXiv 2304.05187) for agdlm.

The math lives here once; which tensor gets which norm, target size s and depth weight is
decided by a policy in `agdlm.optim.rules` (the project spec AGD_SPEC.md, sections 2-3).

    G   = (1/L) * sum_c  s_c * ||g_c||_dual          (c runs over the norm components)
    eta = log((1 + sqrt(1 + 4G)) / 2)                 # e^eta (e^eta - 1) = G
    W_c <- W_c - gain * (eta/L) * s_c * D_c

A *layer* counts `in_L` towards L and owns one or more *components*; a component is one
normed unit (one Frobenius matrix, possibly joined with its bias as an extra column; a
LayerNorm gain under the sign norm; a LayerNorm bias under the RMS norm; an embedding under
the rows norm). A component is made of *parts*, each a contiguous flat interval
[start, stop) of one logical parameter (a whole tensor, a bias, or a q/k/v row block).

One step has three stages so a sharding backend never touches the math:

  (a) local partial sums of every part's norm terms, over the pieces this process holds,
      into ONE vector (sum of squares per part; sum |g| and the count of g != 0 for sign
      parts; one sum of squares per row for rows parts);
  (b) ``vec = binding.reduce(vec)`` (sum over the ranks that shard the parameters);
  (c) G, eta and every normaliser from the reduced vector, then in-place elementwise
      updates of the local pieces.

Binding contract
----------------
A binding is any object with these methods (``grad_storages`` and the ``grads`` argument are
needed only by the momentum variants):

``pieces(index, grads=None) -> iterable of (start, weight, grad)``
    for the logical parameter ``opt.params[index]`` (the order the optimiser was built
    with; shapes ALWAYS come from the logical tensors captured at construction, see
    ``opt.shapes``): zero or more pieces this process holds. ``start`` is the flat offset
    of the piece into the logical tensor flattened in row-major order; ``weight`` is a
    contiguous view that the optimiser updates in place; ``grad`` is the matching view of
    the (already averaged, unscaled) gradient, of the same shape, or None for a zero
    gradient. Either 1-D, or any shape whose row-major order is the piece's (an FSDP2
    shard's rows): the optimiser flattens where it cuts a piece into parts. A piece may start
    and end anywhere (mid-row included: DeepSpeed ZeRO flat fragments); an empty piece or
    no piece at all is fine (FSDP2 ranks holding zero rows). Pieces of one parameter held
    by one process must not overlap, and over all ranks they cover each element exactly
    once.
``reduce(vec) -> vec``
    sum ``vec`` over the group that shards the parameters (may work in place and return
    its argument). The identity for a single process.
``grad_storages() -> list of (key, grad)``
    the local tensors that hold this process's gradients (one per parameter, or one flat
    partition), each with the tensor that keys its optimiser state (the momentum variants
    keep a buffer of the same shape there, so the backend checkpoints it). ``pieces(index,
    grads)`` takes views of ``grads[i]`` (same shapes) where it would view the i-th storage.

The piece layout may change between steps (it is re-read each step and the index plan is
rebuilt when it changes). `LocalBinding` (whole local tensors + identity reduce) is the
default; `opt.bind(binding)` swaps it after a backend has wrapped the model. The step never
calls ``.item()``: eta stays a 0-dim tensor, so there is no host sync on GPU. With
``AGD(compile=True)`` stage (c) runs through torch.compile: G, eta and the scales
(`derive_step`, the eager code itself) and the per-tensor updates (`guarded_update`, checked
against the eager update in tests/test_agd_compile.py); the small-piece flat buffer, rows
parts and spectral directions stay eager.
`log_metrics()` calls ``binding.reduce`` too (for the weight norms), so on a sharded binding
every rank must call them (they are collectives, like the step).
"""

from __future__ import annotations

import itertools
import math

import torch

from agdlm.optim.rules import build_plan
from agdlm.optim.variants import (MomentumGrads, check_variant, newton_schulz_dtype, orthogonalise_many, uses_momentum,
                                  uses_spectral, variant_plan)


# ---- bindings ----------------------------------------------------------------------------

class LocalBinding:
    """Whole local tensors, identity reduce: the single-process (and DDP) binding."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params

    def grad_storages(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(state key, gradient) per tensor that holds gradients: what momentum mirrors."""
        return [(p, p.grad) for p in self.params]

    def pieces(self, index: int, grads: list | None = None):
        """grads: replacements for grad_storages()' gradients (same shapes), e.g. averages."""
        p = self.params[index]
        g = p.grad if grads is None else grads[index]
        return [(0, p.detach().view(-1), None if g is None else g.detach().view(-1))]

    def reduce(self, vec: torch.Tensor) -> torch.Tensor:
        return vec


def eta_from_G(G: torch.Tensor) -> torch.Tensor:
    """The root of e^eta (e^eta - 1) = G: eta = log((1 + sqrt(1 + 4G)) / 2)."""
    return torch.log((1 + torch.sqrt(1 + 4 * G)) / 2)


def _rsqrt_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))


def derive_step(vec: torch.Tensor, t: dict, gain: torch.Tensor, L: float, n_layers: int,
                spectral_idx: torch.Tensor | None = None, spectral_duals: torch.Tensor | None = None) -> dict:
    """Stage (c)'s arithmetic on the reduced vector: G, eta and every scale (t: the
    optimiser's static index tensors). Pure tensor code, so `AGD(compile=True)` can fuse it."""
    acc, nc = vec.dtype, t["norm_coef"].numel()
    comp_ss = torch.zeros(nc, dtype=acc, device=vec.device).index_add_(0, t["sq_comp"], vec[t["sq_slot"]])
    comp_abs = torch.zeros_like(comp_ss).index_add_(0, t["sign_comp"], vec[t["sign_abs"]])
    row_ss = vec[t["row_slot"]]
    rows_sum = torch.zeros_like(comp_ss).index_add_(0, t["row_comp"], row_ss.sqrt())
    dual = t["sqrt_mask"] * comp_ss.sqrt() + comp_abs + rows_sum
    if spectral_idx is not None:  # the variant's dual term <g, O> replaces the Frobenius norm
        dual = dual.index_copy(0, spectral_idx, spectral_duals.to(acc))
    contrib = t["dual_coef"] * dual / L  # each component's share of G
    G = contrib.sum()
    finite = torch.isfinite(G)
    eta = torch.where(finite, eta_from_G(G), torch.zeros_like(G))  # a skipped step moves nothing
    step = gain * eta / L
    comp_scale = -step * t["norm_coef"] * _rsqrt_or_zero(comp_ss[t["ss_src"]])
    if spectral_idx is not None:  # the step is s * O, and O is already unit-scaled
        comp_scale = comp_scale.index_copy(0, spectral_idx, -step * t["norm_coef"][spectral_idx])
    sign_scale = -step * t["norm_coef"]
    row_scale = -step * t["norm_coef"][t["row_comp"]] * _rsqrt_or_zero(row_ss)
    layer_contrib = torch.zeros(n_layers, dtype=acc, device=vec.device).index_add_(0, t["comp_layer"], contrib)
    return dict(eta=eta, G=G, finite=finite, contributions=layer_contrib, component_contributions=contrib,
                comp_scale=comp_scale, sign_scale=sign_scale, row_scale=row_scale)


def guarded_update(ws: list, gs: list, comp_scale: torch.Tensor, sign_scale: torch.Tensor,
                   comps: tuple[int, ...], is_sign: tuple[bool, ...]) -> None:
    """w += scale * g (sign parts: scale * sign(g)), reading g's non-finite entries as 0 so
    that a skipped step (scale 0) leaves w bitwise untouched. Eager, that guard is a pass of
    its own over every gradient; under torch.compile each tensor's update is one pass
    (read w and g, write w): the byte floor. Written as multi-tensor (_foreach) ops so that
    inductor may group the tensors into a few kernels (on the CPU it makes one C++ kernel of
    them either way). Gradients are left as they are."""
    clean = [torch.where(torch.isfinite(g), g, 0.0) for g in gs]
    directions = [x.sign() if sign else x for x, sign in zip(clean, is_sign)]
    scales = [sign_scale[ci] if sign else comp_scale[ci] for ci, sign in zip(comps, is_sign)]
    torch._foreach_add_(ws, torch._foreach_mul(directions, scales))


# ---- the optimiser -----------------------------------------------------------------------

class AGD(torch.optim.Optimizer):
    """AGD built from a model: ``AGD(model, policy="default", gain=1.0)``.

    ``init_weights()`` applies the policy's init (never called implicitly); ``step()``
    returns eta as a 0-dim tensor; ``last_stats`` holds eta, G, the per-layer contributions
    to G and the reduced vector; ``log_metrics()`` gives floats for the trainer.
    """

    def __init__(self, model: torch.nn.Module, policy: str = "default", gain: float = 1.0, variant: str = "none",
                 compile: bool = False):
        if gain <= 0:
            raise ValueError(f"AGD gain={gain} must be positive")
        check_variant(variant)
        params, names, plan = build_plan(model, policy)
        plan = variant_plan(plan, variant)  # the variant's rule changes (spectral_momentum_rows)
        self.params: list[torch.nn.Parameter] = params
        self.param_names: list[str] = names
        self.shapes: list[tuple[int, ...]] = [tuple(p.shape) for p in params]
        self.plan = plan
        self.L = plan.L
        if self.L <= 0:
            raise ValueError("AGD: the model has no layer that counts in L")
        self.acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        super().__init__(params, dict(policy=policy, gain=float(gain), variant=variant,
                                      layer_signature=self._signature()))
        self.policy, self.variant = policy, variant
        self.binding = LocalBinding(self.params)
        self.last_stats: dict[str, torch.Tensor] = {}
        self._build_slots()
        self._plan_cache: tuple | None = None
        self._momentum = MomentumGrads(self) if uses_momentum(variant) else None
        self._spectral = [ci for ci, c in enumerate(plan.components)
                          if c.norm == "frobenius" and uses_spectral(variant)]
        self._spectral_segments = {si for si, seg in enumerate(self.segments) if seg["comp"] in self._spectral}
        # Non-finite G: the step is skipped on every rank (weights untouched), no host sync.
        device = self.params[0].device
        self.consecutive_skips = torch.zeros((), dtype=torch.long, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)
        self._w0_sq: torch.Tensor | None = None  # per-part ||W||^2 before the first step
        self._w0_local: torch.Tensor | None = None  # its local partial sums, before the reduce
        # compile (optim.compile): stage (c) through torch.compile, for GPUs: derive_step's ~40
        # small ops fused, and guarded_update's one pass per tensor instead of guard + update.
        # Each piece layout compiles once (dynamo's cache, shared by every AGD in the process);
        # past torch's recompile limit (8 per function) dynamo falls back to eager with a warning
        # (fullgraph=True would raise instead: a notebook building many models would crash).
        self.compiled = bool(compile)
        self._derive_fn = torch.compile(derive_step, dynamic=False) if compile else derive_step
        self._update_fn = torch.compile(guarded_update, dynamic=False) if compile else None

    # ---- static layout ------------------------------------------------------------------
    def _signature(self) -> list[str]:
        rows = []
        for c in self.plan.components:
            for p in c.parts:
                rows.append(f"{p.tensor}|{p.part}|{p.start}:{p.stop}|{c.norm}|{c.s:.9g}|{c.layer}")
        rows += [f"layer|{l.name}|{l.in_L:g}" for l in self.plan.layers]
        return rows

    def _build_slots(self) -> None:
        """Give every part its slots in the reduced vector and precompute per-component
        coefficients (plain Python; tensors are made lazily on the step's device)."""
        comps = self.plan.components
        self.segments: list[dict] = []  # one per part
        n = 0
        for ci, c in enumerate(comps):
            for p in c.parts:
                seg = dict(comp=ci, norm=c.norm, param=p.param_index, start=p.start, stop=p.stop, dim=c.dim)
                if c.norm == "rows":
                    seg["row_base"] = n
                    seg["nrows"] = (p.stop - p.start) // c.dim
                    n += seg["nrows"]
                else:
                    seg["sq"] = n
                    n += 1
                    if c.norm == "sign":
                        seg["abs"], seg["nnz"] = n, n + 1
                        n += 2
                self.segments.append(seg)
        self.n_slots = n
        self.by_param: list[list[int]] = [[] for _ in self.params]
        for si, seg in enumerate(self.segments):
            self.by_param[seg["param"]].append(si)
        # per component: coefficient on the dual norm (contribution to G) and on the step
        self._norm_coef, self._dual_coef, self._ss_src = [], [], []
        for ci, c in enumerate(comps):
            if c.norm in ("frobenius", "sign"):
                k = c.s
            elif c.norm in ("rms", "rows"):
                k = c.s * math.sqrt(c.dim)
            elif c.norm == "follow":
                k = comps[c.leader].s
            else:  # frozen
                k = 0.0
            self._norm_coef.append(k)
            self._dual_coef.append(0.0 if c.norm in ("follow", "frozen") else k)
            self._ss_src.append(c.leader if c.norm == "follow" else ci)
        self._tensors_device = None

    def _static_tensors(self, device: torch.device) -> dict:
        if self._tensors_device == device:
            return self._t
        acc, comps = self.acc_dtype, self.plan.components
        sq_segs = [s for s in self.segments if "sq" in s]
        sign_segs = [s for s in self.segments if s["norm"] == "sign"]
        row_slots, row_comp = [], []
        for s in self.segments:
            if s["norm"] == "rows":
                row_slots += range(s["row_base"], s["row_base"] + s["nrows"])
                row_comp += [s["comp"]] * s["nrows"]
        sq_all = [s["sq"] for s in sq_segs] + row_slots

        def t(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=device)

        self._t = dict(
            sq_slot=t([s["sq"] for s in sq_segs]),
            sq_comp=t([s["comp"] for s in sq_segs]),
            sign_abs=t([s["abs"] for s in sign_segs]),
            sign_comp=t([s["comp"] for s in sign_segs]),
            row_slot=t(row_slots),
            row_comp=t(row_comp),
            grad_sq=t(sq_all),
            sqrt_mask=t([c.norm in ("frobenius", "rms", "follow") for c in comps], acc),
            is_sign=t([c.norm == "sign" for c in comps], torch.bool),
            norm_coef=t(self._norm_coef, acc),
            dual_coef=t(self._dual_coef, acc),
            ss_src=t(self._ss_src),
            comp_layer=t([c.layer for c in comps]),
        )
        self._tensors_device = device
        return self._t

    # ---- bindings -----------------------------------------------------------------------
    def bind(self, binding) -> None:
        """Swap the binding (after a backend has wrapped or sharded the model)."""
        if self._momentum is not None:  # buffers exist before any checkpoint template is taken
            self._momentum.ensure_state([key for key, _ in binding.grad_storages()])
        self.binding = binding
        self._plan_cache = None

    def _local_layout(self) -> list[tuple[int, int, torch.Tensor, int, int | None]]:
        """Whole-tensor bindings: per segment (segment, param index, weight view, start, stop
        or None when the segment is the whole tensor), built once and rebuilt only when a
        parameter's storage moves (checked by data pointer), so a step makes no views of
        whole-tensor weights and only one slice per sub-tensor part (q/k/v, rows)."""
        key = tuple(p.data_ptr() for p in self.params)
        if getattr(self, "_layout_key", None) != key:
            layout = []
            for si, seg in enumerate(self.segments):
                p = self.params[seg["param"]]
                whole = seg["start"] == 0 and seg["stop"] == p.numel() and seg["norm"] != "rows"
                w = p.detach() if whole else p.detach().view(-1)[seg["start"] : seg["stop"]]
                layout.append((si, seg["param"], w, seg["start"], None if whole else seg["stop"]))
            self._layout, self._layout_key = layout, key
        return self._layout

    def _gather_pieces(self, grads: list | None = None):
        """[(segment index, weight view, grad view or None, absolute flat start)] for every
        overlap of a held piece with a part. grads: replacements for the binding's gradient
        storages (the momentum averages)."""
        binding = self.binding
        if isinstance(binding, LocalBinding):
            grads = [p.grad for p in self.params] if grads is None else grads
            out = []
            layout = self._local_layout()
            for si, pi, w, start, stop in layout:
                g = grads[pi]
                if g is not None and stop is not None:  # (grads never require grad: no detach)
                    g = g.view(-1)[start:stop]
                out.append((si, w, g, start))
            # what fixes the step layout: the weight views and which gradients exist
            self._pieces_key = (id(layout), tuple(g is None for g in grads))
            return out
        # Which parts a piece overlaps depends only on (parameter, start, length): computed once
        # per piece geometry; a part covering the whole piece takes the piece's own views (any
        # shape), any other part (and every rows part, whose rows are cut flat) a 1-D slice.
        # The weight's slices are kept while the binding hands back the same weight view.
        cuts_of = self.__dict__.setdefault("_piece_cuts", {})
        out, key = [], []
        for i in range(len(self.params)):
            if not self.by_param[i]:
                continue
            for start, w, g in (binding.pieces(i) if grads is None else binding.pieces(i, grads)):
                n = w.numel()
                if n == 0:
                    continue
                cuts = cuts_of.get((i, start, n))
                if cuts is None or cuts[0] is not w:
                    cuts = (w, self._cut(i, start, n, w))
                    cuts_of[(i, start, n)] = cuts
                key.append((i, start, n, g is None))
                for si, a, b, lo, w_part in cuts[1]:
                    out.append((si, w_part, g if a is None or g is None else g.view(-1)[a:b], lo))
        self._pieces_key = tuple(key)
        return out

    def _cut(self, i: int, start: int, n: int, w: torch.Tensor) -> list[tuple]:
        """The parts of parameter i that the piece [start, start + n) overlaps:
        (segment, a, b, absolute start, weight view), a = b = None where the part covers the
        whole piece (its views are the piece's own), else the piece's elements [a, b)."""
        cuts = []
        for si in self.by_param[i]:
            lo, hi = max(self.segments[si]["start"], start), min(self.segments[si]["stop"], start + n)
            if lo >= hi:
                continue
            if hi - lo == n and self.segments[si]["norm"] != "rows":
                cuts.append((si, None, None, lo, w))
            else:
                cuts.append((si, lo - start, hi - start, lo, w.view(-1)[lo - start : hi - start]))
        return cuts

    def _step_layout(self, pieces, device) -> dict:
        """Where each piece goes in the step (flat buffer, sum of squares, sign terms, rows;
        which update), fixed by the piece layout: built once per layout (the key
        `_gather_pieces` leaves, plus the gradients' dtype), so a step does no per-piece
        bookkeeping in Python."""
        dtype = next((g.dtype for _, _, g, _ in pieces if g is not None), None)
        key = (self._pieces_key, dtype, str(device))
        cache = self.__dict__.setdefault("_layout_cache", {})
        lay = cache.get(key)
        if lay is not None:
            return lay
        if len(cache) > 8:
            cache.clear()
        acc, on_cpu = self.acc_dtype, torch.device(device).type == "cpu"
        flat = self._flat_plan(pieces, device)
        in_flat = set(flat["pieces"]) if flat is not None else set()
        big, small, signs, rows, scaled = [], [], [], [], []
        for k, (si, w, g, lo) in enumerate(pieces):
            if g is None or k in in_flat:
                continue
            norm, ci = self.segments[si]["norm"], self.segments[si]["comp"]
            if norm == "rows":
                rows.append(k)
                continue
            (big if on_cpu and g.numel() >= CPU_DOT_MIN_NUMEL and g.dtype == acc else small).append(k)
            if norm == "sign":
                signs.append(k)
            if norm in ("frobenius", "rms", "follow", "sign"):
                scaled.append((k, ci, norm == "sign"))
        segs = [self.segments[pieces[k][0]] for k in big + small]
        lay = dict(flat=flat, big=big, small=small, sq_slots=self._index(tuple(seg["sq"] for seg in segs), device),
                   signs=signs, rows=rows, scaled=scaled, guarded=sorted(big + small + rows),
                   sign_slots=self._index(tuple(self.segments[pieces[k][0]]["abs"] for k in signs)
                                          + tuple(self.segments[pieces[k][0]]["nnz"] for k in signs), device))
        cache[key] = lay
        return lay

    # ---- stage (a) ----------------------------------------------------------------------
    def _flat_plan(self, pieces, device) -> dict | None:
        """The small pieces (under FLAT_MAX_NUMEL elements for the device, Frobenius/RMS/follow/sign, one
        dtype) are served by one flat buffer: a fixed handful of ops for all of them, however
        many tensors the model has (the host-bound case: deep, narrow models). Sign pieces come
        last so their elements are one contiguous tail. Built once per step layout."""
        limit = FLAT_MAX_NUMEL.get(torch.device(device).type, FLAT_MAX_NUMEL["cuda"])
        small = [k for k, (si, w, g, _) in enumerate(pieces)
                 if g is not None and g.numel() < limit and g.dtype == w.dtype
                 and self.segments[si]["norm"] in ("frobenius", "rms", "follow", "sign")
                 and si not in self._spectral_segments]
        if small:
            dtype = pieces[small[0]][2].dtype
            small = [k for k in small if pieces[k][2].dtype == dtype]
        if len(small) < 2:  # (flattening one tensor would give a view of the gradient, not a copy)
            return None
        small.sort(key=lambda k: self.segments[pieces[k][0]]["norm"] == "sign")
        segs = [self.segments[pieces[k][0]] for k in small]
        sizes = [pieces[k][2].numel() for k in small]
        n_sign = sum(1 for seg in segs if seg["norm"] == "sign")

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        plan = dict(
            pieces=small, sizes=sizes, total=sum(sizes), lens=t(sizes), sq_slot=t([seg["sq"] for seg in segs]),
            comp=t([seg["comp"] for seg in segs]), sign_start=sum(sizes[: len(sizes) - n_sign]),
            sign_lens=t(sizes[len(sizes) - n_sign :]),
            sign_slots=t([seg["abs"] for seg in segs if seg["norm"] == "sign"]
                         + [seg["nnz"] for seg in segs if seg["norm"] == "sign"]),
        )
        if SYNC_FREE_SEGMENTS.get(torch.device(device).type, False):
            # Segment bounds (into fp64 prefix sums) and each element's component (see
            # SYNC_FREE_SEGMENTS).
            ends = list(itertools.accumulate(sizes))
            tail_ends = [e - plan["sign_start"] for e in ends[len(sizes) - n_sign :]]
            plan.update(
                bounds=(t([0] + ends[:-1]), t(ends)),
                sign_bounds=(t([0] + tail_ends[:-1]), t(tail_ends)),
                elem_comp=plan["comp"].repeat_interleave(plan["lens"], output_size=plan["total"]),
            )
        return plan

    def _local_sums(self, pieces, lay: dict, device) -> torch.Tensor:
        acc = self.acc_dtype
        vec = torch.zeros(self.n_slots, dtype=acc, device=device)
        plan = lay["flat"]
        self._flat_step = None
        if plan is not None:  # (a) for every small piece at once
            # (flatten/unflatten_dense_tensors: the per-piece views made in C++, not Python)
            flat = torch._C._nn.flatten_dense_tensors([pieces[k][2] for k in plan["pieces"]])
            wide = flat if flat.dtype == acc else flat.to(acc)
            tail = wide[plan["sign_start"] :]
            if "bounds" in plan:  # CUDA: no host sync
                vec.index_add_(0, plan["sq_slot"], _segment_sums(wide.square(), plan["bounds"]).to(acc))
                if len(plan["sign_lens"]):
                    l1 = _segment_sums(tail.abs(), plan["sign_bounds"])
                    nnz = _segment_sums(tail != 0, plan["sign_bounds"])
                    vec.index_add_(0, plan["sign_slots"], torch.cat([l1, nnz]).to(acc))
            else:
                vec.index_add_(0, plan["sq_slot"], torch.segment_reduce(wide.square(), "sum", lengths=plan["lens"]))
                if len(plan["sign_lens"]):
                    l1 = torch.segment_reduce(tail.abs(), "sum", lengths=plan["sign_lens"])
                    nnz = torch.segment_reduce((tail != 0).to(acc), "sum", lengths=plan["sign_lens"])
                    vec.index_add_(0, plan["sign_slots"], torch.cat([l1, nnz]))
            self._flat_step = (plan, flat)
        for k in lay["rows"]:
            si, _, g, lo = pieces[k]
            seg = self.segments[si]
            for r, pos, n, width in _row_chunks(g.numel(), lo - seg["start"], seg["dim"]):
                gr = g[pos : pos + n * width].view(n, width)
                base = seg["row_base"] + r
                vec[base : base + n] += torch.linalg.vector_norm(gr, dim=1, dtype=acc).square()
        values = [torch.dot(g, g) for g in (pieces[k][2].reshape(-1) for k in lay["big"])]
        if lay["small"]:
            norms = torch._foreach_norm([pieces[k][2] for k in lay["small"]], 2, dtype=acc)
            values += torch._foreach_mul(norms, norms)
        if values:
            vec.index_add_(0, lay["sq_slots"], torch.stack(values))
        if lay["signs"]:  # one multi-tensor op each for sum |g| and the nonzero count (ord 0)
            views = [pieces[k][2] for k in lay["signs"]]
            l1 = torch.stack(torch._foreach_norm(views, 1, dtype=acc))
            nnz = torch.stack(torch._foreach_norm(views, 0, dtype=acc))
            vec.index_add_(0, lay["sign_slots"], torch.cat([l1, nnz]))
        return vec

    def _index(self, slots: tuple, device) -> torch.Tensor:
        """Slot index tensors, cached per piece layout (no host-to-device copy per step)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        key = (slots, device)
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = torch.tensor(slots, dtype=torch.long, device=device)
        return cache[key]

    # ---- stage (c) ----------------------------------------------------------------------
    def _derive(self, vec: torch.Tensor, gain: float, spectral: dict | None = None) -> dict:
        t = self._static_tensors(vec.device)
        idx = duals = None
        if spectral:  # orthogonalised directions: the dual term is <g, O>, the step is s * O
            idx = self._index(tuple(spectral), vec.device)
            duals = torch.stack(list(spectral.values()))
        d = self._derive_fn(vec, t, self._gain_tensor(gain, vec.device), self.L, len(self.plan.layers), idx, duals)
        d["vec"] = vec
        return d

    def _gain_tensor(self, gain: float, device) -> torch.Tensor:
        """The gain as a cached 0-dim tensor: a Python float would be a constant of the compiled
        derive stage, recompiled for every new value."""
        cached = getattr(self, "_gain_cache", None)
        if cached is None or cached[0] != (gain, device):
            cached = self._gain_cache = ((gain, device), torch.tensor(gain, dtype=self.acc_dtype, device=device))
        return cached[1]

    def _apply(self, pieces, lay: dict, d: dict, directions: dict | None = None) -> None:
        if self._flat_step is not None:  # (c) for every small piece at once
            plan, flat = self._flat_step
            flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # see the guard below
            t = self._static_tensors(flat.device)
            scale = torch.where(t["is_sign"], d["sign_scale"], d["comp_scale"]).to(flat.dtype)
            if len(plan["sign_lens"]):
                flat[plan["sign_start"] :].sign_()
            if "elem_comp" in plan:
                flat.mul_(scale[plan["elem_comp"]])
            else:
                flat.mul_(scale[plan["comp"]].repeat_interleave(plan["lens"], output_size=plan["total"]))
            ws = [pieces[k][1] for k in plan["pieces"]]
            torch._foreach_add_(ws, torch._C._nn.unflatten_dense_tensors(flat, ws))
            self._flat_step = None
        # Per-component scales: 0-dim device tensors on an accelerator (no host sync); on the CPU
        # Python floats (free to read there, and they let one _foreach_addcmul_ update every
        # tensor; on CUDA a float list would be a host sync).
        on_cpu = d["comp_scale"].device.type == "cpu"
        if on_cpu:
            comp_scale, sign_scale = d["comp_scale"].tolist(), d["sign_scale"].tolist()
        else:
            comp_scale, sign_scale = d["comp_scale"].unbind(0), d["sign_scale"].unbind(0)
        row_scale, row_offset = d["row_scale"], self._row_scale_offsets()
        # spectral variants: pieces whose step is along O (never reads g); all others: along g
        along_o = [e for e in lay["scaled"] if directions and e[0] in directions]
        plain = [e for e in lay["scaled"] if not (directions and e[0] in directions)] if along_o else lay["scaled"]
        if self.compiled and plain:  # the guard below is inside the compiled update's one pass
            self._update_fn([pieces[k][1] for k, _, _ in plain], [pieces[k][2] for k, _, _ in plain],
                            d["comp_scale"], d["sign_scale"], tuple(ci for _, ci, _ in plain),
                            tuple(is_sign for _, _, is_sign in plain))
        # A non-finite gradient times a zero (skipped) scale would still be NaN: zero it. The
        # identity whenever G is finite (then every gradient is); the gradient is not used after
        # the step. On an accelerator that costs one more read and write of each gradient every
        # step (knowing whether the step is skipped would be a host sync); on the CPU reading the
        # flag is free, so the pass runs only on a skipped step.
        if not on_cpu or not bool(d["finite"]):
            for k in lay["rows"] if self.compiled else lay["guarded"]:
                pieces[k][2].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if not self.compiled and plain:
            signs = dict(zip(lay["signs"], torch._foreach_sign([pieces[k][2] for k in lay["signs"]]))) if lay["signs"] else {}
            by = [signs[k] if is_sign else pieces[k][2] for k, _, is_sign in plain]
            scales = [sign_scale[ci] if is_sign else comp_scale[ci] for _, ci, is_sign in plain]
            if on_cpu:  # one multi-tensor op for all: w + g * s * 1, s a Python float
                torch._foreach_addcmul_([pieces[k][1] for k, _, _ in plain], by, self._ones_like(lay, by), scales)
            else:
                for (k, _, _), x, s in zip(plain, by, scales):
                    pieces[k][1].addcmul_(x, s)
        for k, ci, _ in along_o:
            w = pieces[k][1]
            w.add_(directions[k].view_as(w).nan_to_num() * comp_scale[ci])
        for k in lay["rows"]:
            si, w, g, lo = pieces[k]
            seg, base = self.segments[si], row_offset[si]
            for r, pos, n, width in _row_chunks(g.numel(), lo - seg["start"], seg["dim"]):
                sl = slice(pos, pos + n * width)
                w[sl].view(n, width).addcmul_(g[sl].view(n, width), row_scale[base + r : base + r + n, None].to(w.dtype))
        # frozen: nothing

    @staticmethod
    def _ones_like(lay: dict, tensors: list) -> list:
        """Ones broadcast to each tensor's shape (views of one 0-dim tensor, cached in the step
        layout): the constant factor that turns _foreach_addcmul_ into w + s * g per tensor."""
        key = (tuple(t.shape for t in tensors), tensors[0].dtype)
        cached = lay.get("ones")
        if cached is None or cached[0] != key:
            one = torch.ones((), dtype=tensors[0].dtype, device=tensors[0].device)
            cached = lay["ones"] = (key, [one.expand_as(t) for t in tensors])
        return cached[1]

    def _row_scale_offsets(self) -> dict[int, int]:
        if not hasattr(self, "_row_offsets"):
            off, n = {}, 0
            for si, s in enumerate(self.segments):
                if s["norm"] == "rows":
                    off[si] = n
                    n += s["nrows"]
            self._row_offsets = off
        return self._row_offsets

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        device = self.params[0].device
        gain = self.param_groups[0]["gain"]
        averages = None
        if self._momentum is not None:  # variant: the step sees the averaged gradient
            averages = self._momentum.average(self.binding.grad_storages())
        pieces = self._gather_pieces(averages)  # (a) local partial sums
        if self._w0_sq is None and self._w0_local is None:  # reduced at the first log_metrics (a collective)
            self._w0_local = self._weight_norms_sq(pieces, device, reduce=False)
        lay = self._step_layout(pieces, device)
        vec = self._local_sums(pieces, lay, device)
        spectral, directions = self._spectral_directions(pieces) if self._spectral else (None, None)
        if spectral and not isinstance(self.binding, LocalBinding):  # this rank's <g, O> and ||O||^2 terms
            n = len(vec)
            vec = self.binding.reduce(torch.cat([vec, spectral.pop("partial").to(vec.dtype)]))  # (b) one reduction
            spectral, vec = self._spectral_sums(vec[n:]), vec[:n]
        else:
            vec = self.binding.reduce(vec)  # (b) one reduction
        d = self._derive(vec, gain, spectral)  # (c) eta, normalisers, in-place updates
        self._apply(pieces, lay, d, directions)
        if directions:
            d["direction_sq"] = self._direction_sq
        if self._momentum is not None:
            self._momentum.commit(d["finite"] & (d["G"] > 0))
        skipped = (~d["finite"]).long()
        self.consecutive_skips.add_(1).mul_(skipped)  # +1 on a skip, 0 after a good step
        self.skipped_steps.add_(skipped)
        d["skipped_steps"] = self.skipped_steps
        self.last_stats = d
        return d["eta"]

    def _spectral_directions(self, pieces) -> tuple[dict, dict]:
        """Variant `spectral`: for each Frobenius matrix component, the Newton-Schulz
        orthogonalisation O of its whole gradient (a [W|b] pair as one matrix with the bias as
        an extra column). Returns ({component: <g, O>}, {piece position: O on that piece}).

        On a sharded binding each matrix is orthogonalised once, by one owner rank
        (agdlm.parallel.owners: an all-to-all assembles it there, a second returns each rank
        its own elements of O). Its <g, O> and ||O||^2 terms are then this rank's partial sums,
        returned under "partial" to ride in the step's one all-reduce (_spectral_sums)."""
        if not isinstance(self.binding, LocalBinding):
            return self._sharded_spectral_directions(pieces)
        full = {si: g for si, _, g, _ in pieces if g is not None and si in self._spectral_segments}
        if len(full) != len(self._spectral_segments):
            return {}, {}  # a matrix without gradient (not this model's training path): faithful rule
        duals, whole_dirs = {}, {}
        self._direction_sq = {}
        blocks_of = {ci: self._component_blocks(ci, [full[si].float() for si in self._segments_of(ci)])
                     for ci in self._spectral}
        ms = [torch.cat(b, dim=1) if len(b) > 1 else b[0] for b in blocks_of.values()]
        os_ = orthogonalise_many(ms, newton_schulz_dtype(self.params[0].device))  # same shapes stacked
        for ci, m, o in zip(self._spectral, ms, os_):
            segs, blocks = self._segments_of(ci), blocks_of[ci]
            duals[ci] = (m * o).sum(dtype=torch.float64)  # fp32 products summed in fp64: layouts agree
            col_sq = o.square().sum(dim=0)  # per column, to split by part below
            for si, region in zip(segs, self._split_columns(o, blocks)):
                whole_dirs[si] = region
            col = 0
            for si, block in zip(segs, blocks):
                self._direction_sq[si] = col_sq[col : col + block.shape[1]].sum()
                col += block.shape[1]
        directions = {}
        for k, (si, _, g, lo) in enumerate(pieces):
            if g is not None and si in whole_dirs:
                off = lo - self.segments[si]["start"]
                directions[k] = whole_dirs[si][off : off + g.numel()].to(g.dtype)
        return duals, directions

    def _segments_of(self, ci: int) -> list[int]:
        return [si for si, seg in enumerate(self.segments) if seg["comp"] == ci]

    def _component_blocks(self, ci: int, regions: list[torch.Tensor]) -> list[torch.Tensor]:
        """A component's flat part regions as the column blocks of its matrix (a bias: one column)."""
        return [g.view(part.shape) if len(part.shape) == 2 else g.view(-1, 1)
                for g, part in zip(regions, self.plan.components[ci].parts)]

    @staticmethod
    def _split_columns(o: torch.Tensor, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        out, col = [], 0
        for block in blocks:
            out.append(o[:, col : col + block.shape[1]].reshape(-1))
            col += block.shape[1]
        return out

    def _owner_exchange(self, pieces, selected: list[int]):
        """One OwnerExchange per piece layout (the layout's all_gather runs once)."""
        from agdlm.parallel.owners import OwnerExchange, newton_schulz_cost

        cached = getattr(self, "_exchange", None)
        if cached is not None and cached[0] == self._pieces_key:
            return cached[1]
        region_of = {si: r for r, si in enumerate(sorted(self._spectral_segments))}
        sizes = [self.segments[si]["stop"] - self.segments[si]["start"] for si in sorted(self._spectral_segments)]
        jobs, costs = [], []
        for ci in self._spectral:
            segs = self._segments_of(ci)
            jobs.append([region_of[si] for si in segs])
            rows = self.plan.components[ci].parts[0].shape[0]
            cols = sum(p.shape[1] if len(p.shape) == 2 else 1 for p in self.plan.components[ci].parts)
            costs.append(newton_schulz_cost(rows, cols))
        local = [(region_of[pieces[k][0]], pieces[k][3] - self.segments[pieces[k][0]]["start"], pieces[k][2].numel())
                 for k in selected]
        exchange = OwnerExchange(getattr(self.binding, "group", None), sizes, jobs, costs, local)
        self._exchange = (self._pieces_key, exchange)
        return exchange

    def _sharded_spectral_directions(self, pieces) -> tuple[dict, dict]:
        selected = [k for k, (si, _, g, _) in enumerate(pieces) if g is not None and si in self._spectral_segments]
        exchange = self._owner_exchange(pieces, selected)

        device = self.params[0].device
        dtype = newton_schulz_dtype(device)  # also what the exchange carries: bf16 on accelerators

        def orthogonalise_owned(owned: dict) -> dict:
            blocks = {j: self._component_blocks(self._spectral[j], list(regions)) for j, regions in owned.items()}
            ms = [torch.cat(b, dim=1) if len(b) > 1 else b[0] for b in blocks.values()]
            return {j: self._split_columns(o, blocks[j]) for j, o in zip(blocks, orthogonalise_many(ms, dtype))}

        results = exchange.run([pieces[k][2] for k in selected], orthogonalise_owned, dtype, device)
        self.exchange_bytes = exchange.bytes_sent
        # this rank's terms: <g, O> per component, ||O||^2 per segment (reduced with the step's vector)
        comp_pos = {ci: i for i, ci in enumerate(self._spectral)}
        seg_pos = {si: len(self._spectral) + i for i, si in enumerate(sorted(self._spectral_segments))}
        partial = torch.zeros(len(self._spectral) + len(seg_pos), dtype=torch.float64, device=device)
        directions = {}
        for k, o in zip(selected, results):
            si, _, g, _ = pieces[k]
            o = o.float()
            partial[comp_pos[self.segments[si]["comp"]]] += (g.reshape(-1).float() * o).sum(dtype=torch.float64)
            partial[seg_pos[si]] += o.square().sum().double()
            directions[k] = o.to(g.dtype)
        return {"partial": partial}, directions

    def _spectral_sums(self, reduced: torch.Tensor) -> dict:
        """The all-reduced partial terms of _sharded_spectral_directions: {component: <g, O>}
        (and ||O||^2 per segment, for the diagnostics)."""
        nc = len(self._spectral)
        self._direction_sq = {si: reduced[nc + i] for i, si in enumerate(sorted(self._spectral_segments))}
        return {ci: reduced[i] for i, ci in enumerate(self._spectral)}

    def _weight_norms_sq(self, pieces, device, reduce: bool = True) -> torch.Tensor:
        """||W_part||^2 of every part (one reduce: a collective on a sharded binding)."""
        w_sq = torch.zeros(len(self.segments), dtype=self.acc_dtype, device=device)
        if pieces:
            norms = torch._foreach_norm([w for _, w, _, _ in pieces], 2, dtype=self.acc_dtype)
            idx = torch.tensor([si for si, _, _, _ in pieces], device=device)
            w_sq.index_add_(0, idx, torch.stack(norms).square())
        return self.binding.reduce(w_sq) if reduce else w_sq

    # ---- init ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The policy's init: matrices (or q/k/v blocks) semi-orthogonal with singular
        values s, embedding rows under the rows rule of the given norm, biases 0,
        LayerNorm gains 1. Works on whole (unsharded) tensors: call it before wrapping."""
        for c in self.plan.components:
            for p in c.parts:
                param = self.params[p.param_index]
                if param.device.type == "meta":
                    continue
                region = param.detach().view(-1)[p.start : p.stop].view(p.shape)
                if p.init == "orthogonal":
                    q = orthogonal_fp64(p.shape, generator)
                    region.view(q.shape).copy_(q.mul_(p.init_scale))
                elif p.init == "rows":
                    x = torch.randn(p.shape, dtype=torch.float64, generator=generator)
                    x *= p.init_scale / x.norm(dim=1, keepdim=True)
                    region.copy_(x)
                elif p.init == "zeros":
                    region.zero_()
                elif p.init == "ones":
                    region.fill_(1.0)

    # ---- diagnostics --------------------------------------------------------------------
    def layer_table(self) -> list[dict]:
        """One row per part, in model order (a layer's rows together): tensor, part, role,
        shape, norm, s, in_L (on the layer's first row), layer."""
        rows = []
        first = set()
        layer_pos: dict[int, int] = {}
        for c in self.plan.components:
            for p in c.parts:
                layer_pos[c.layer] = min(layer_pos.get(c.layer, p.param_index), p.param_index)
        order = sorted(range(len(self.plan.components)),
                       key=lambda ci: (layer_pos[self.plan.components[ci].layer], self.plan.components[ci].layer, ci))
        for c in (self.plan.components[ci] for ci in order):
            for p in c.parts:
                counts = 0.0
                if c.layer not in first:
                    first.add(c.layer)
                    counts = self.plan.layers[c.layer].in_L
                rows.append(dict(tensor=p.tensor, part=p.part, role=c.role, shape=tuple(p.shape), norm=c.norm,
                                 s=c.s, in_L=counts, layer=self.plan.layers[c.layer].name))
        return rows

    @torch.no_grad()
    def _segment_norms_sq(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||W_part||^2, ||dW_part||^2) for every part: weights from the held pieces (one
        reduce: collective on a sharded binding), updates from the last step's vector."""
        d = self.last_stats
        vec = d["vec"]
        w_sq = self._weight_norms_sq(self._gather_pieces(), vec.device)
        dw_sq = torch.zeros_like(w_sq)
        offs = self._row_scale_offsets()
        for si, seg in enumerate(self.segments):
            norm, ci = seg["norm"], seg["comp"]
            if si in d.get("direction_sq", {}):  # variant spectral: the step is along O, not g
                dw_sq[si] = d["comp_scale"][ci].square() * d["direction_sq"][si]
            elif norm in ("frobenius", "rms", "follow"):
                dw_sq[si] = d["comp_scale"][ci].square() * vec[seg["sq"]]
            elif norm == "sign":
                dw_sq[si] = d["sign_scale"][ci].square() * vec[seg["nnz"]]
            elif norm == "rows":
                rs = d["row_scale"][offs[si] : offs[si] + seg["nrows"]]
                dw_sq[si] = (rs.square() * vec[seg["row_base"] : seg["row_base"] + seg["nrows"]]).sum()
        return w_sq, dw_sq

    def log_metrics(self) -> dict[str, float]:
        """Floats for the trainer (host sync; collective on a sharded binding).

        agd_rel_update/<role> is the mean over the role's components (a matrix joined with
        its bias counts once, as the pair; q/k/v blocks each once) of ||dW||_F / ||W||_F,
        with dW the last step's update and W the weights after it."""
        d = self.last_stats
        if not d:
            return {}
        t = self._static_tensors(d["vec"].device)
        G = float(d["G"])
        out = {"agd_eta": float(d["eta"]), "agd_G": G,
               "agd_grad_norm": float(d["vec"][t["grad_sq"]].sum().sqrt()),
               "agd_skipped_steps": int(self.skipped_steps)}
        shares: dict[str, float] = {}
        for c, v in zip(self.plan.components, d["component_contributions"].tolist()):
            shares[c.role] = shares.get(c.role, 0.0) + v
        for role, v in shares.items():
            out[f"agd_share/{role}"] = v / G if G > 0 else 0.0
        if self._w0_sq is None and self._w0_local is not None:
            self._w0_sq = self.binding.reduce(self._w0_local)
        w_sq, dw_sq = (x.tolist() for x in self._segment_norms_sq())
        w0_sq = self._w0_sq.tolist() if self._w0_sq is not None else [0.0] * len(w_sq)
        nc = len(self.plan.components)
        comp_w, comp_dw, comp_w0 = [0.0] * nc, [0.0] * nc, [0.0] * nc
        for si, seg in enumerate(self.segments):
            comp_w[seg["comp"]] += w_sq[si]
            comp_dw[seg["comp"]] += dw_sq[si]
            comp_w0[seg["comp"]] += w0_sq[si]
        per_role: dict[str, list[float]] = {}
        growth: dict[str, list[float]] = {}
        for c, w, dw, w0 in zip(self.plan.components, comp_w, comp_dw, comp_w0):
            per_role.setdefault(c.role, []).append(math.sqrt(dw / w) if w > 0 else 0.0)
            if w0 > 0:
                growth.setdefault(c.role, []).append(math.sqrt(w / w0))
        for role, v in per_role.items():
            out[f"agd_rel_update/{role}"] = sum(v) / len(v)
        for role, v in growth.items():  # ||W|| / ||W0||, W0 = the weights before this run's first step
            out[f"agd_weight_ratio/{role}"] = sum(v) / len(v)
        return out

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        # for agd_weight_ratio across a resume (a host copy at save time); the key is always
        # there, so a DCP template made before the first step (FSDP2) loads the saved value
        sd["param_groups"][0]["initial_weight_norms_sq"] = None if self._w0_sq is None else self._w0_sq.tolist()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups", [])
        if len(groups) != 1:
            raise ValueError(f"AGD state_dict: expected 1 param group, got {len(groups)}")
        saved = groups[0]
        if saved.get("policy") != self.policy:
            raise ValueError(f"AGD state_dict was saved with policy={saved.get('policy')!r}, "
                             f"this optimiser uses policy={self.policy!r}")
        if saved.get("variant", "none") != self.variant:
            raise ValueError(f"AGD state_dict was saved with variant={saved.get('variant', 'none')!r}, "
                             f"this optimiser uses variant={self.variant!r}")
        if saved.get("layer_signature") != self.param_groups[0]["layer_signature"]:
            raise ValueError("AGD state_dict: the saved layer table differs from this model's "
                             "(different model shape or policy rules)")
        w0 = saved.get("initial_weight_norms_sq")
        super().load_state_dict(state_dict)
        if w0 is not None and len(w0) == len(self.segments):
            self._w0_sq = torch.tensor(w0, dtype=self.acc_dtype, device=self.params[0].device)


# On CPU _foreach_norm runs one thread: gradients this big get a BLAS dot each, which uses every
# thread (15 ms vs 9 ms for GPT-2-124M's grads on 2 cores); the many small ones share one
# _foreach_norm.
CPU_DOT_MIN_NUMEL = 1 << 16
# Pieces smaller than this share one flat buffer in the step: a fixed handful of ops for all
# of them. On GPU that saves a kernel launch per tensor; on CPU the copy costs more than the
# dispatch it saves except for tiny vectors (measured: `agdlm bench optim`, 48x64 case).
FLAT_MAX_NUMEL = {"cuda": 1 << 16, "cpu": 1 << 12}
# The flat buffer's per-piece sums on CUDA: segment_reduce synchronises with the host there
# (seen under set_sync_debug_mode("error") on an H200), so they are differences of fp64 prefix
# sums at the segment bounds (deterministic; an index_add_ per element is sync-free too and
# measured about as fast, but its atomics sum in a different order each run), and the scales
# are one per-element gather. Other devices (the CPU: no sync to avoid) keep segment_reduce.
SYNC_FREE_SEGMENTS = {"cuda": True}


def _segment_sums(x: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Sums of x >= 0 over contiguous segments [start, end), in fp64, with no host sync: the
    differences of fp64 prefix sums. Their error is ~1e-16 of the running total, not of the
    segment, and a parallel scan need not be monotone, so a zero segment can come out as
    +-1e-12-sized noise: clamped at 0 (a negative sum of squares would make G NaN)."""
    prefix = torch.nn.functional.pad(x.to(torch.float64).cumsum(0), (1, 0))
    return (prefix[bounds[1]] - prefix[bounds[0]]).clamp_min_(0)


def _row_chunks(n: int, off: int, d: int) -> list[tuple[int, int, int, int]]:
    """Split a flat piece of n elements, starting `off` elements into a rows part with row
    length d, into (row, position in the piece, number of rows, width) chunks: a partial
    head row, whole rows, a partial tail row."""
    out, pos = [], 0
    head = (-off) % d
    if head:
        k = min(head, n)
        out.append((off // d, 0, 1, k))
        pos = k
    full = (n - pos) // d
    if full:
        out.append(((off + pos) // d, pos, full, d))
        pos += full * d
    if pos < n:
        out.append(((off + pos) // d, pos, 1, n - pos))
    return out


def orthogonal_draw(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """The one random draw of nn.init.orthogonal_: a (rows, numel/rows) fp64 normal block (the
    QR draws nothing). A replay that must only advance the generator calls this alone."""
    rows = shape[0]
    return torch.empty((rows, math.prod(shape) // rows), dtype=torch.float64).normal_(0, 1, generator=generator)


def orthogonal_fp64(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """torch.nn.init.orthogonal_ on an fp64 tensor of `shape`, bit for bit (same draw, same
    LAPACK geqrf + orgqr that linalg.qr runs), as a (rows, numel/rows) matrix, with two fp64
    copies of the matrix alive at once instead of four (the input, linalg.qr's working copy
    and Q, the output tensor): the embedding's init dominates a rank's start-up peak."""
    x = orthogonal_draw(shape, generator)
    rows, cols = x.shape
    if rows < cols:
        x = x.t()
    a, tau = torch.geqrf(x)
    del x
    q = torch.linalg.householder_product(a, tau)
    q *= torch.diagonal(a).sign()  # R's diagonal: Q made uniform, as orthogonal_ does
    del a
    return q.t() if rows < cols else q


def format_layer_table(opt: AGD) -> str:
    rows = opt.layer_table()
    head = ("tensor", "part", "role", "shape", "norm", "s", "in L")
    spectral = uses_spectral(opt.variant)
    cells = [(r["tensor"], r["part"], r["role"], "x".join(map(str, r["shape"])),
              "spectral" if spectral and r["norm"] == "frobenius" else r["norm"], f"{r['s']:.4g}",
              f"{r['in_L']:g}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*c) for c in cells]
    variant = "" if opt.variant == "none" else f", variant={opt.variant}"
    lines.append(f"total L = {opt.L:g}  (policy={opt.policy}{variant}, gain={opt.param_groups[0]['gain']:g}, "
                 f"{len(opt.plan.layers)} layers, {len(rows)} parts)")
    return "\n".join(lines)
