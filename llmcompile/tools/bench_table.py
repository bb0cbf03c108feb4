"""``llmcompile bench``: the result table."""

from __future__ import annotations

from typing import Any


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` result."""
    bw = result["memory_bandwidth"]
    lines = [
        f"model {result['model']} ({result['parameters'] / 1e6:.1f} M params, "
        f"{result['weight_bytes'] / 2**20:.1f} MiB weights streamed, {result['dtype']}), prompt "
        f"{result['prompt_len']}, {result['new_tokens']} new tokens, {result['threads']} threads",
        f"interleaved: {result['warmup']} warm-up runs per configuration, then "
        f"{result['repeats']} timed rounds (order rotated), medians over rounds",
        f"memory bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s "
        f"(MBU uses read)",
        f"cpu: {result.get('cpu', 'not recorded')}",
        "",
    ]
    header = (f"{'config':<16}{'compile s':>10}{'TTFT ms':>10}{'x eager':>8}"
              f"{'TPOT ms':>10}{'tok/s':>9}{'x eager':>8}{'weights MiB':>12}{'MBU':>7}"
              f"{'graphs':>7}{'match':>7}")
    lines += [header, "-" * len(header)]
    for r in result["results"]:
        label = r["name"] if r["kind"] == "baseline" else f"llmc:{r['name']}"
        if r["error"]:
            lines.append(f"{label:<16}  error: {r['error']}")
            continue
        mbu = None if r["mbu"] is None else 100 * r["mbu"]
        mib = None if r["weight_bytes"] is None else r["weight_bytes"] / 2**20
        match = {True: "yes", False: "NO", None: "-"}[r["tokens_match"]]
        lines.append(
            f"{label:<16}{fmt(r['compile_s'], '.1f'):>10}{fmt(r['prefill_ms'], '.2f'):>10}"
            f"{fmt(r['prefill_speedup'], '.2f'):>8}{fmt(r['decode_ms_per_token'], '.2f'):>10}"
            f"{fmt(r['decode_tokens_per_s'], '.1f'):>9}{fmt(r['decode_speedup'], '.2f'):>8}"
            f"{fmt(mib, '.1f'):>12}{fmt(mbu, '.1f') + '%':>7}{r['graphs_compiled']:>7}{match:>7}")
    lines += _predicted(result)
    notes = [f"  {r['name']}: {w}" for r in result["results"] for w in r["warnings"]]
    if notes:
        lines += ["", "warnings:"] + notes
    return "\n".join(lines)


def _predicted(result: dict[str, Any]) -> list[str]:
    """Predicted (cost model + this machine's roofline) beside measured."""
    machine = result.get("machine")
    if not machine:
        return []
    lines = ["", f"predicted by the cost model (`llmcompile machine`: read "
             f"{machine['read_bps'] / 1e9:.1f} GB/s, GEMM {machine['gemm_flops'] / 1e9:.0f} "
             f"GFLOP/s, {machine['launch_s'] * 1e6:.1f} us/kernel + {machine['call_s'] * 1e6:.0f}"
             f" us/call):",
             f"{'config':<16}{'TTFT ms':>10}{'measured':>10}{'TPOT ms':>10}{'measured':>10}"
             f"{'tok/s':>8}{'measured':>10}  terms"]
    for r in result["results"]:
        label = r["name"] if r["kind"] == "baseline" else f"llmc:{r['name']}"
        if r["predicted_decode_ms"] is None:
            lines.append(f"{label:<16}  no prediction: {r['prediction']}")
            continue
        lines.append(
            f"{label:<16}{fmt(r['predicted_prefill_ms'], '.2f'):>10}"
            f"{fmt(r['prefill_ms'], '.2f'):>10}{fmt(r['predicted_decode_ms'], '.2f'):>10}"
            f"{fmt(r['decode_ms_per_token'], '.2f'):>10}"
            f"{fmt(r['predicted_tokens_per_s'], '.1f'):>8}"
            f"{fmt(r['decode_tokens_per_s'], '.1f'):>10}  {r['prediction']}")
    return lines
