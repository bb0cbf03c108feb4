"""From cost to time: a roofline of one machine, plus a per-kernel overhead.

Each node takes ``max(flops / peak, bytes / bandwidth)``; weights streamed by a matmul go at
the speed its kernel was measured to reach at that size (a float GEMV, an int8 or int4 packed
kernel: on a CPU these are not all bandwidth-bound, and small matrices pay a latency floor),
everything else at the machine's read bandwidth. A step adds ``launches × launch_s + call_s``:
the time a compiled call spends outside kernels (wrapper, guards, kernel launches), fitted once
from measured decode steps of small models whose kernels take no time to speak of.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .cost import GraphCost, NodeCost

__all__ = ["Machine", "Prediction", "interpolate", "predict"]


@dataclass(frozen=True)
class Machine:
    """What one machine sustains, measured (``llmcompile machine``)."""

    #: bytes/s read from memory (``x.sum()`` over a tensor larger than the caches)
    read_bps: float
    #: float32 FLOP/s of a large GEMM
    gemm_flops: float
    #: bytes/s of weights a matmul kind streams in one-token decode (float32, int8, int4):
    #: the slope of its largest measured sizes
    weight_bps: Mapping[str, float] = field(default_factory=dict)
    #: per kind, measured ``[weight bytes, seconds]`` of one-token matmuls, smallest first:
    #: a matmul's time is interpolated between them (small ones pay a latency floor)
    matmul_curve: Mapping[str, list] = field(default_factory=dict)
    #: seconds per kernel launch and per compiled call outside kernels
    launch_s: float = 0.0
    call_s: float = 0.0
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"weight_bps": dict(self.weight_bps),
                               "matmul_curve": {k: [list(p) for p in v]
                                                for k, v in self.matmul_curve.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Machine:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class Prediction:
    """Predicted seconds of one step, split into the roofline's terms."""

    compute_s: float  # nodes whose flops bound them
    memory_s: float  # nodes whose bytes bound them
    overhead_s: float  # launches × launch_s + call_s
    launches: int
    #: per kind (matmul, attention, ...): seconds
    by_kind: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.compute_s + self.memory_s + self.overhead_s


def _weight_kind(node: NodeCost) -> str:
    if node.kind == "packed":
        return "int4" if "int4" in node.op or "nbits" in node.op else "int8"
    return "float32"


def _node_seconds(node: NodeCost, values: Mapping, machine: Machine) -> tuple[float, bool]:
    """(seconds, compute-bound) of one node at concrete sizes."""
    c = node.cost.numbers(values)
    weights = c["weights"] / machine.read_bps
    if node.kind in ("matmul", "packed"):
        kind = _weight_kind(node)
        curve = machine.matmul_curve.get(kind)
        weights = (interpolate(curve, c["weights"]) if curve else
                   c["weights"] / machine.weight_bps.get(kind, machine.read_bps))
    memory = weights + (c["kv"] + c["activations"]) / machine.read_bps
    compute = c["flops"] / machine.gemm_flops
    return max(memory, compute), compute > memory


def interpolate(curve, nbytes: float) -> float:
    """Seconds for ``nbytes`` from measured ``[(bytes, seconds)]``, smallest first: linear
    between points, the smallest point's time below it, the last slope beyond the largest."""
    if nbytes <= curve[0][0]:
        return curve[0][1]
    for (b0, t0), (b1, t1) in zip(curve, curve[1:]):
        if nbytes <= b1:
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
    (b0, t0), (b1, t1) = curve[-2], curve[-1]
    return t1 + (t1 - t0) * (nbytes - b1) / (b1 - b0)


def predict(cost: GraphCost, values: Mapping, machine: Machine) -> Prediction:
    """Seconds of one call of the graph at sizes ``values`` ({S: 1, P: 512, B: 1})."""
    out = Prediction(0.0, 0.0, cost.launches * machine.launch_s + machine.call_s, cost.launches)
    cache: dict[tuple, tuple[float, bool]] = {}
    for node in cost.nodes:
        key = (node.kind, node.op, node.cost)
        if key not in cache:  # layers repeat: evaluate each distinct formula once
            cache[key] = _node_seconds(node, values, machine)
        seconds, bound = cache[key]
        if bound:
            out.compute_s += seconds
        else:
            out.memory_s += seconds
        out.by_kind[node.kind] = out.by_kind.get(node.kind, 0.0) + seconds
    return out
