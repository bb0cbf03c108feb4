"""``llmcompile cost``: closed forms of a model's cost under a recipe, and predicted speed.

The model is captured as :func:`llmcompile.export` captures it (``torch.export``, dynamic
batch ``b``, step length ``s`` and past length ``p``, attention as ``llmcompile.attention``),
the recipe's passes run on it, and the cost model (:mod:`llmcompile.analysis.cost`) gives
every total as a sympy formula. Prefill is the step with ``p = 0``, decode the step with
``s = 1``. Predicted times come from this machine's roofline (``llmcompile machine``).

Calibrated quantization (AWQ, GPTQ) only changes the values of the packed weights, not their
layout or bytes: unless ``calibrate=True``, the cost runs those passes as round-to-nearest
and says so (``notes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy

from ..analysis.cost import B, Cost, GraphCost, P, S
from ..analysis.delta import CostObserver
from ..analysis.roofline import Machine, predict
from ..core.recipe import Recipe
from ..registry import resolve_recipe

__all__ = ["LENGTHS", "CostReport", "add_arguments", "cost", "main"]

LENGTHS = (128, 512, 2048, 8192)


@dataclass
class CostReport:
    """Closed forms, a table at :data:`LENGTHS` and what each pass changed."""

    model: str
    recipe: str
    graph: GraphCost
    passes: list[tuple[str, Any]] = field(default_factory=list)  # (pass, CostDelta)
    machine: Machine | None = None
    notes: list[str] = field(default_factory=list)

    def prefill(self) -> Cost:
        """Cost of a prompt of ``s`` tokens (no past), formulas of ``s`` and ``b``."""
        return self.graph.total().subs({P: 0}).simplify()

    def decode(self) -> Cost:
        """Cost of one token after ``p`` cached ones, formulas of ``p`` and ``b``."""
        return self.graph.total().subs({S: 1}).simplify()

    def predicted(self, lengths=LENGTHS) -> list[dict[str, float]]:
        """Per length: prefill of that many tokens and a decode step after that many."""
        rows = []
        for n in lengths:
            row = {"length": n}
            for name, at in (("prefill", {S: n, P: 0, B: 1}), ("decode", {S: 1, P: n, B: 1})):
                c = self.graph.total().numbers(at)
                row.update({f"{name}_flops": c["flops"], f"{name}_bytes": c["bytes"],
                            f"{name}_weight_bytes": c["weights"], f"{name}_kv_bytes": c["kv"]})
                if self.machine is not None:
                    row[f"{name}_s"] = predict(self.graph, at, self.machine).seconds
            if self.machine is not None:
                row["decode_tokens_per_s"] = 1 / row["decode_s"]
                row["mbu"] = (row["decode_weight_bytes"] * row["decode_tokens_per_s"]
                              / self.machine.read_bps)
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        def forms(c: Cost) -> dict[str, str]:
            return {"flops": str(c.flops), "bytes": str(sympy.expand(c.bytes)),
                    "weight_bytes": str(c.weights), "kv_bytes": str(c.kv),
                    "activation_bytes": str(c.activations),
                    "intensity": str(sympy.simplify(c.flops / c.bytes))}

        return {"model": self.model, "recipe": self.recipe, "symbols": {
                    "s": "tokens in the step", "p": "past (cached) length", "b": "batch"},
                "prefill": forms(self.prefill()), "decode": forms(self.decode()),
                "predicted": self.predicted(),
                "machine": self.machine.to_dict() if self.machine else None,
                "passes": [{"pass": name, "change": str(delta)} for name, delta in self.passes],
                "partial": self.graph.partial, "unknown_ops": dict(self.graph.unknown),
                "notes": self.notes}

    def format(self) -> str:
        return _format(self)


def _capture(module):
    """The export-style program of a causal LM and the renaming of its size symbols."""
    from ..deploy.export import _geometry, capture_program

    try:
        program, _, _ = capture_program(module, _geometry(module.config))
    except Exception as e:  # noqa: BLE001 - say what cannot be costed, not where torch failed
        raise ValueError(f"cannot cost {type(module).__name__}: capturing it with a KV cache "
                         f"(as llmcompile.export does) failed: {str(e).splitlines()[0][:300]}"
                         ) from e
    user = [n for n in program.graph.nodes if n.op == "placeholder" and not program.is_weight(n)]
    ids, past = user[0].meta["val"], user[2].meta["val"] if len(user) > 2 else None
    rename = {ids.shape[0].node.expr: B, ids.shape[1].node.expr: S}
    if past is not None:
        rename[past.shape[2].node.expr] = P
    return program, rename


def _uncalibrated(recipe: Recipe) -> tuple[Recipe, list[str]]:
    passes, notes = [], []
    for p in recipe.passes:
        if getattr(p, "method", "rtn") not in ("rtn", None) and p.name == "quantize_weights":
            notes.append(f"{p.name}: method {p.method!r} costed as 'rtn' (same packed layout "
                         "and bytes; pass calibrate=True to run the calibration)")
            p = dataclasses.replace(p, method="rtn")
        passes.append(p)
    return dataclasses.replace(recipe, passes=tuple(passes)), notes


def cost(model: Any, recipe: Any = None, *, machine: Machine | None | bool = True,
         calibrate: bool = False) -> CostReport:
    """The cost of ``model`` (an nn.Module, ``"smollm2"``, a tiny architecture or a folder)
    under ``recipe``; ``machine`` (True: this machine's cached profile, measured if missing;
    None/False: no predicted times) turns it into time."""
    from ..core.pipeline import run_pipeline
    from .explain import load_model

    recipe = resolve_recipe(recipe)
    module = load_model(model)
    notes: list[str] = []
    if not calibrate:
        recipe, notes = _uncalibrated(recipe)
    program, rename = _capture(module)
    program.context.update(target=recipe.target, tokenizer=None)
    observer = CostObserver(rename)
    report = run_pipeline(program, recipe, observe=observer)
    if machine is True:
        from .machine import load_machine

        machine = load_machine()
    passes = [(run.name, run.cost) for run in report.runs if run.cost is not None]
    name = model if isinstance(model, str) else type(module).__name__
    return CostReport(str(name), recipe.name, report.cost.after, passes, machine or None, notes)


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def _format(r: CostReport) -> str:
    pre, dec = r.prefill(), r.decode()
    lines = [f"{r.model}, recipe {r.recipe!r}  (s: tokens in the step, p: past length, "
             "b: batch)", "prefill(s):"]
    for c in (pre, dec):
        if c is dec:
            lines.append("decode(p):")
        lines += [f"  FLOPs           {c.flops}", f"  weight bytes    {c.weights}",
                  f"  KV bytes        {c.kv}", f"  activation bytes {c.activations}",
                  f"  intensity       {sympy.simplify(c.flops / c.bytes)} FLOP/byte"]
    rows = r.predicted()
    head = f"{'length':>7} {'prefill GFLOP':>13} {'weights MiB':>11} {'KV MiB':>8}"
    if r.machine:
        head += f" {'TTFT ms':>9} {'TPOT ms':>8} {'tok/s':>7} {'MBU':>5}"
    lines += ["", head]
    for row in rows:
        line = (f"{row['length']:>7} {row['prefill_flops'] / 1e9:>13.2f} "
                f"{_mib(row['decode_weight_bytes']):>11} {_mib(row['decode_kv_bytes']):>8}")
        if r.machine:
            line += (f" {row['prefill_s'] * 1e3:>9.1f} {row['decode_s'] * 1e3:>8.2f} "
                     f"{row['decode_tokens_per_s']:>7.1f} {row['mbu']:>5.0%}")
        lines.append(line)
    lines.append("(weights/KV: one decode step after `length` tokens; TTFT: a prompt of "
                 "`length` tokens)")
    if r.passes:
        lines += ["", "what each pass changed (one step, formulas of s, p, b):"]
        lines += [f"  {name}: {delta}" for name, delta in r.passes]
    if r.graph.partial:
        lines.append(f"PARTIAL: ops without a cost rule (not counted): {dict(r.graph.unknown)}")
    if r.machine:
        lines.append(f"machine: {r.machine.description}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def plot(report: CostReport, path: Path, bench: Path | None = None) -> None:
    """Predicted TTFT and decode tokens/s against length, measured bench points on top."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'llmcompile[plot]'") from e
    lengths = [2**i for i in range(5, 14)]
    rows = report.predicted(lengths)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.loglog(lengths, [r["prefill_s"] * 1e3 for r in rows], label="predicted")
    ax1.set(xlabel="prompt tokens", ylabel="TTFT (ms)", title="prefill")
    ax2.semilogx(lengths, [r["decode_tokens_per_s"] for r in rows], label="predicted")
    ax2.set(xlabel="past tokens", ylabel="tokens/s", title="decode")
    if bench is not None:
        points = _bench_points(bench, report.recipe, report.model)
        if not points:
            raise ValueError(f"{bench} has no measurement of model {report.model!r} with "
                             f"recipe {report.recipe!r}")
        for entry in points:
            ax1.plot(entry["prompt_len"], entry["prefill_ms"], "o", label="measured")
            ax2.plot(entry["prompt_len"], entry["decode_tokens_per_s"], "o", label="measured")
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle(f"{report.model}, recipe {report.recipe!r}")
    fig.tight_layout()
    fig.savefig(path)


def _bench_points(path: Path, recipe: str, model: str) -> list[dict[str, Any]]:
    """Measured (prompt length, TTFT, decode tok/s) of ``recipe`` on ``model`` in a bench JSON
    (one run, or a list of runs at several prompt lengths)."""
    data = json.loads(Path(path).read_text())
    runs = data if isinstance(data, list) else [data]
    out = []
    for run in runs:
        if run.get("model") != model:
            continue
        for entry in run.get("results", []):
            if entry.get("name") == recipe and entry.get("decode_tokens_per_s"):
                out.append({"prompt_len": run["prompt_len"], "prefill_ms": entry["prefill_ms"],
                            "decode_tokens_per_s": entry["decode_tokens_per_s"]})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'smollm2', a tiny architecture name or a transformers folder")
    p.add_argument("--recipe", default="default", help="preset name or .toml path")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw predicted (and, with "
                   "--bench, measured) speed against length (needs matplotlib)")
    p.add_argument("--bench", type=Path, help="a `llmcompile bench --json` file to plot")
    p.add_argument("--no-machine", action="store_true", help="formulas only, no predicted "
                   "times (skips measuring this machine)")
    p.add_argument("--calibrate", action="store_true", help="run calibrated passes for real")


def main(args: argparse.Namespace) -> int:
    report = cost(args.model, args.recipe, machine=not args.no_machine,
                  calibrate=args.calibrate)
    print(report.format())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot, args.bench)
        print(f"wrote {args.plot}")
    return 0
