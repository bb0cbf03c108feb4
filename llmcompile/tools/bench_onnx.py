"""``llmcompile bench-onnx``: llmcompile's ONNX export against ONNX Runtime's own paths.

Side by side, in one run, on the same ONNX Runtime and thread count:

* ``builder-fp32`` / ``builder-int4``: ONNX Runtime GenAI's model builder
  (``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``, when onnxruntime-genai
  is installed) on the same weights saved as a Hugging Face folder; its hand-written graphs per
  architecture are the strongest peer for "LLM -> ONNX". Its build time is the subprocess's
  wall time (it loads the folder from disk; ours starts from the loaded model);
* ``peer-fp32``: ``torch.onnx.export`` of the same model (same KV-cache I/O), then ONNX
  Runtime's own transformer optimizer (``onnxruntime.transformers.optimizer``);
* ``peer-int4``: that file quantized by ONNX Runtime's ``MatMulNBitsQuantizer`` (round to
  nearest, block 64, accuracy level 4; LM head left in float like our int4 preset);
* ``llmcompile-<recipe>``: ``llmcompile.export`` with each recipe (default: fp32 fusion, int4).

For each: file size (with external data), prefill latency, decode tokens/s, Model Bandwidth
Utilization (initializer bytes read per token -- all but gather-only tables -- × tokens/s ÷
memory bandwidth measured in the same run) and whether the greedy tokens agree with eager
PyTorch. Timing rounds are interleaved across configurations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["add_arguments", "main", "run"]


def _peer_export(model, folder: Path, threads: int) -> Path:
    """torch.onnx.export of the model with the same I/O, optimized by ONNX Runtime."""
    from onnxruntime.transformers.optimizer import optimize_model

    from ..deploy.export import _geometry, _names, capture_causal_lm, write_sidecar

    geo = _geometry(model.config)
    ep, args, _ = capture_causal_lm(model, geo)
    inputs, outputs = _names(geo["layers"])
    raw = folder / "peer-raw.onnx"
    torch.onnx.export(ep, args, dynamo=True, opset_version=20, verbose=False,
                      report=False, input_names=inputs, output_names=outputs
                      ).save(str(raw), external_data=True)
    text = model.config
    optimized = optimize_model(str(raw), model_type="gpt2", num_heads=text.num_attention_heads,
                               hidden_size=text.hidden_size, opt_level=2, use_gpu=False,
                               only_onnxruntime=False)
    out = folder / "peer-fp32.onnx"
    optimized.save_model_to_file(str(out), use_external_data_format=True)
    write_sidecar(out, model)
    return out


def _peer_int4(fp32: Path, folder: Path, block: int) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32))
    vocab = json.loads(fp32.with_name(fp32.stem + ".llmcompile.json").read_text())["vocab_size"]
    weights = {i.name for i in model.graph.initializer if vocab in i.dims}
    weights |= {n.output[0] for n in model.graph.node  # a transposed copy of the embedding
                if n.op_type == "Transpose" and n.input[0] in weights}
    heads = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
             and any(i in weights for i in n.input)]  # the LM head stays float, as in ours
    if not heads:
        raise RuntimeError("peer-int4: the LM head MatMul was not found")
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=False,
                                     accuracy_level=4, nodes_to_exclude=heads)
    quantizer.process()
    quantizer.model.remove_unused_constant()  # the float weights it replaced
    out = folder / "peer-int4.onnx"
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    out.with_name(out.stem + ".llmcompile.json").write_text(
        fp32.with_name(fp32.stem + ".llmcompile.json").read_text())
    return out


def _hf_folder(model, tokenizer, root: Path) -> Path:
    """The model's weights as a Hugging Face folder (the builder's input), written once."""
    folder = root / "hf"
    if (folder / "config.json").is_file():
        return folder
    # loaded from GGUF: the weights are dequantized floats, but transformers refuses to save a
    # model it marked as quantized; unmark it for the save only
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if qconfig is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig
    return folder


def builder_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def _builder(model, hf: Path, root: Path, precision: str) -> Path:
    """ONNX Runtime GenAI's model builder on ``hf``: ``builder-<precision>/model.onnx``."""
    import onnx

    from ..deploy.export import write_sidecar

    out = root / f"builder-{precision}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
           str(out), "-p", precision, "-e", "cpu", "-c", str(root / "builder-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = out / "model.onnx"
    if done.returncode or not path.is_file():
        raise RuntimeError(f"the model builder failed ({' '.join(cmd)}):\n"
                           f"{done.stderr[-2000:]}")
    graph = onnx.load(str(path), load_external_data=False).graph
    write_sidecar(path, model, inputs=[i.name for i in graph.input],
                  outputs=[o.name for o in graph.output])
    return path


def _bytes_per_token(path: Path) -> int:
    """Bytes of initializers a decode step reads (tables only gathered from are excluded)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    users: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        if users.get(init.name, set()) <= {"Gather", "GatherBlockQuantized"}:
            continue
        size = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += int(np.prod(init.dims)) * size
    return total


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")
               if not f.name.endswith(".json"))


def _time_once(lm, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    logits, past = lm.forward(prompt[None])
    prefill = time.perf_counter() - start
    tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        logits, past = lm.forward(np.array([[token]], dtype=np.int64), past)
    return prefill, new_tokens / (time.perf_counter() - start), tokens


def run(recipes: tuple[str, ...] = ("default", "int4"), prompt_len: int = 128,
        new_tokens: int = 32, repeats: int = 5, threads: int = 2, folder: str = "bench-onnx",
        block: int = 64, reuse: bool = False, builder: bool = True) -> dict[str, Any]:
    from ..deploy.export import export
    from ..deploy.runner import OnnxCausalLM
    from ..registry import resolve_recipe
    from .measure import measure_bandwidth
    from .models import greedy_generate, load_smollm2

    bandwidth = measure_bandwidth()
    model, tokenizer = load_smollm2()
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    build: dict[str, float | None] = {}

    def make(name: str, path: Path, fn) -> None:
        start = time.perf_counter()
        if reuse and path.is_file():
            files[name], build[name] = path, None
            return
        files[name] = fn()
        build[name] = time.perf_counter() - start

    if builder and builder_available():
        hf = _hf_folder(model, tokenizer, root)
        for precision in ("fp32", "int4"):
            path = root / f"builder-{precision}" / "model.onnx"
            make(f"builder-{precision}", path, lambda p=precision: _builder(model, hf, root, p))
    make("peer-fp32", root / "peer-fp32.onnx", lambda: _peer_export(model, root, threads))
    make("peer-int4", root / "peer-int4.onnx", lambda: _peer_int4(files["peer-fp32"], root,
                                                                  block))
    stages: dict[str, dict[str, float]] = {}

    def ours(name: str, recipe: str, path: Path) -> Path:
        result = export(model, path, resolve_recipe(recipe), tokenizer=tokenizer)
        stages[name] = result.seconds
        return result.path

    for recipe in recipes:
        path = root / f"llmcompile-{recipe}" / "model.onnx"
        make(f"llmcompile-{recipe}", path,
             lambda r=recipe, p=path: ours(f"llmcompile-{r}", r, p))
    from .quality import DEFAULT_TEXT

    text = DEFAULT_TEXT.read_text()
    prompt = tokenizer(text, return_tensors="np").input_ids[0, :prompt_len].astype(np.int64)
    eager = greedy_generate(model, model.forward, torch.from_numpy(prompt)[None], new_tokens)
    sessions = {name: OnnxCausalLM(path, threads=threads) for name, path in files.items()}
    for lm in sessions.values():  # warm up (first-touch memory, kernel packing)
        _time_once(lm, prompt, 4)
    timings: dict[str, list] = {name: [] for name in sessions}
    names = list(sessions)
    for i in range(repeats):  # interleaved rounds, order rotated each round
        for name in names[i % len(names):] + names[: i % len(names)]:
            timings[name].append(_time_once(sessions[name], prompt, new_tokens))
    rows = []
    for name, runs in timings.items():
        tps = statistics.median(r[1] for r in runs)
        read = _bytes_per_token(files[name])
        rows.append({"config": name, "file_mib": _size(files[name]) / 2**20,
                     "weights_read_mib": read / 2**20,
                     "mbu": read * tps / (bandwidth["read_GBps"] * 1e9),
                     "build_s": build[name], "build_stages_s": stages.get(name),
                     "prefill_ms": 1000 * statistics.median(r[0] for r in runs),
                     "decode_tok_s": statistics.median(r[1] for r in runs),
                     "tokens_match_eager": runs[0][2] == eager,
                     "token_agreement": float(np.mean([a == b for a, b in zip(runs[0][2],
                                                                              eager)]))})
    return {"model": "SmolLM2-135M-Instruct", "prompt_len": prompt_len,
            "memory_bandwidth": bandwidth,
            "new_tokens": new_tokens, "repeats": repeats, "threads": threads, "rows": rows}


def file_quality(folder: str = "bench-onnx", windows: int = 8, seq_len: int = 512,
                 threads: int = 2) -> dict[str, Any]:
    """Perplexity on the held-out text, and top-1 agreement with eager fp32, of every exported
    file in ``folder`` (as written by :func:`run`)."""
    import torch.nn.functional as F

    from ..deploy.runner import OnnxCausalLM
    from .models import load_smollm2
    from .quality import DEFAULT_TEXT, _windows

    model, tokenizer = load_smollm2()
    ids = _windows(tokenizer, DEFAULT_TEXT.read_text(), windows, seq_len)
    with torch.no_grad():
        reference = [model(input_ids=w[None], use_cache=False).logits[0] for w in ids]
    files = {"eager-fp32": None,
             **{p.parent.name: p for p in sorted(Path(folder).glob("builder-*/model.onnx"))},
             **{p.stem: p for p in sorted(Path(folder).glob("peer-*.onnx"))
                if p.stem != "peer-raw"},
             **{p.parent.name: p for p in sorted(Path(folder).glob("llmcompile-*/model.onnx"))}}
    rows = []
    for name, path in files.items():
        lm = OnnxCausalLM(path, threads=threads) if path else None
        nll, agree, count = 0.0, 0, 0
        for w, ref in zip(ids, reference):
            logits = torch.from_numpy(lm.forward(w.numpy()[None])[0][0]) if lm else ref
            nll += float(F.cross_entropy(logits[:-1].float(), w[1:], reduction="sum"))
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            count += w.numel()
        rows.append({"config": name, "perplexity": float(np.exp(nll / (count - len(ids)))),
                     "top1_agreement": agree / count})
    base = rows[0]["perplexity"]
    for r in rows:
        r["change"] = r["perplexity"] / base - 1
    return {"windows": windows, "seq_len": seq_len, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    rows = {r["config"]: r for r in result["rows"]}
    peer = "builder" if any(name.startswith("builder-") for name in rows) else "peer"
    lines = [f"memory bandwidth: read {result['memory_bandwidth']['read_GBps']:.1f} GB/s",
             "", "| config | file MiB | build s | weights read MiB | prefill ms | decode tok/s "
             f"| MBU | decode vs {peer} (same bits) | greedy = eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        bits = "int4" if "int4" in r["config"] else "fp32"
        base = rows.get(f"{peer}-{bits}")
        ratio = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        match = "yes" if r["tokens_match_eager"] else f"{r['token_agreement']:.0%} of tokens"
        build = f"{r['build_s']:.0f}" if r["build_s"] is not None else "reused"
        lines.append(f"| {r['config']} | {r['file_mib']:.1f} | {build} | "
                     f"{r['weights_read_mib']:.1f} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['mbu']:.1%} | {ratio:.2f}x | {match} |")
    staged = [r for r in result["rows"] if r.get("build_stages_s")]
    if staged:
        names = list(dict.fromkeys(k for r in staged for k in r["build_stages_s"]))
        lines += ["", "build time by stage, seconds (calibration apart):", "",
                  "| config | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {r['config']} | " + " | ".join(
            f"{r['build_stages_s'].get(k, 0.0):.1f}" for k in names) + " |" for r in staged]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", nargs="+", default=["default", "int4"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder", default="bench-onnx", help="where the ONNX files are written")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--no-builder", dest="builder", action="store_false",
                   help="leave out ONNX Runtime GenAI's model builder (otherwise built when "
                   "onnxruntime-genai is installed)")
    p.add_argument("--reuse", action="store_true",
                   help="time the files already in --folder instead of exporting them again")
    p.add_argument("--quality", type=int, default=0, metavar="WINDOWS",
                   help="instead of timing, measure perplexity and top-1 agreement of the "
                   "files already in --folder on WINDOWS x 512 tokens of held-out text")


def main(args: argparse.Namespace) -> int:
    if args.quality:
        result = file_quality(args.folder, args.quality, threads=args.threads)
        print("| file | perplexity | change vs eager fp32 | top-1 agreement |\n|---|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['config']} | {r['perplexity']:.3f} | {r['change']:+.2%} | "
                  f"{r['top1_agreement']:.1%} |")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    result = run(tuple(args.recipes), args.prompt_len, args.new_tokens, args.repeats,
                 args.threads, args.folder, reuse=args.reuse, builder=args.builder)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
