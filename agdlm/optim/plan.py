"""The layer description a policy produces (agdlm.optim.rules) and the optimiser consumes
(agdlm.optim.agd): plain data, so neither module imports the other's internals."""

from __future__ import annotations

from dataclasses import dataclass, field

NORMS = ("frobenius", "sign", "rms", "rows", "follow", "frozen")


@dataclass
class Part:
    """A flat interval [start, stop) of logical parameter `param_index`."""

    param_index: int
    start: int
    stop: int
    tensor: str  # the parameter's name
    part: str  # "weight", "bias", "q", "k", "v", "q.bias", ...
    shape: tuple[int, ...]  # the region's shape, for display and init
    init: str  # "orthogonal", "zeros", "ones", "rows", "none"
    init_scale: float = 1.0  # orthogonal: singular value; rows: row L2 norm


@dataclass
class Component:
    norm: str  # one of NORMS
    s: float  # target size in this norm (s_aug for joined [W|b])
    role: str
    layer: int  # index into the layer list
    parts: list[Part] = field(default_factory=list)
    dim: int = 1  # rms: vector length d; rows: row length d
    leader: int | None = None  # follow: the component whose normaliser and s are used


@dataclass
class Layer:
    name: str
    role: str
    in_L: float


@dataclass
class LayerPlan:
    components: list[Component]
    layers: list[Layer]

    @property
    def L(self) -> float:
        return float(sum(layer.in_L for layer in self.layers))
