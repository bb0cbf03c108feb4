"""Export a causal LM to ONNX with a recipe and generate with ONNX Runtime.

    python examples/onnx_export.py                    # SmolLM2-135M, default (fusion) recipe
    python examples/onnx_export.py --recipe int4      # calibrated int4 -> MatMulNBits
    python examples/onnx_export.py --tiny             # a 2-layer random Llama, for a quick check

Writes model.onnx (+ .data, + .llmcompile.json) to a folder, prints the contrib ops it holds
and its size, then generates greedily with the file and with eager PyTorch and compares.
"""

import argparse
import collections
import tempfile
from pathlib import Path

import onnx
import torch

import llmcompile
from llmcompile import OnnxCausalLM
from llmcompile.tools.models import greedy_generate, load_smollm2, smollm2_folder, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    if args.tiny:
        model, tokenizer, folder = tiny_model("llama"), None, None
        ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    else:
        (model, tokenizer), folder = load_smollm2(), str(smollm2_folder())
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = Path(args.out or tempfile.mkdtemp(prefix="llmc-onnx-")) / "model.onnx"

    result = llmcompile.export(model, out, args.recipe, tokenizer=folder)
    ops = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False)
                              .graph.node)
    contrib = {k: v for k, v in ops.items() if k in (
        "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
        "RotaryEmbedding", "MatMulNBits")}
    print(f"wrote {out} ({result.size_bytes / 2**20:.1f} MiB), contrib ops: {contrib}")

    lm = OnnxCausalLM(out)
    got = lm.generate(ids[0].tolist(), args.new_tokens, eos_token_id=-1)
    want = greedy_generate(model, model.forward, ids, args.new_tokens)
    if tokenizer is not None:
        print("onnxruntime:", repr(tokenizer.decode(got)))
        print("eager:      ", repr(tokenizer.decode(want)))
    print(f"greedy tokens identical: {got == want}")


if __name__ == "__main__":
    main()
