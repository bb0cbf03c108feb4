"""One fresh process of tests/deploy/test_startup.py: generate on a tiny Llama with a calibrated
int4 recipe, print what was compiled, loaded and solved as one JSON line.

    python startup_child.py PROMPT_LENS TARGET [--save DIR] [--load DIR]

PROMPT_LENS: comma-separated prompt lengths, generated after one another (the first decides
what is compiled first).
"""

import argparse
import json

import torch

import llmcompile
from llmcompile.core import stages
from llmcompile.tools.models import tiny_model

RECIPE = {"name": "awq4-tiny", "passes": [
    {"name": "fuse"},
    {"name": "quantize_weights", "bits": 4, "group_size": 64, "method": "awq+gptq",
     "calibration": {"samples": 4, "seq_len": 64}}]}


class ByteTokenizer:
    """Bytes as token ids (the tiny model's vocabulary is 256)."""

    def __call__(self, text, return_tensors=None):
        return type("Encoded", (), {"input_ids": torch.tensor([list(text.encode())[:4096]])})()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prompts")
    p.add_argument("target", choices=["inductor", "eager"])
    p.add_argument("--save")
    p.add_argument("--load")
    args = p.parse_args()
    if args.load:
        llmcompile.load_artifacts(args.load)
    model = tiny_model("llama")
    recipe = llmcompile.load_recipe({**RECIPE, "target": args.target})
    tokens = []
    compiled = None
    for n in map(int, args.prompts.split(",")):
        ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n))
        if args.target == "eager":
            compiled = compiled or llmcompile.compile(model, recipe, tokenizer=ByteTokenizer())
            with torch.no_grad():
                compiled(input_ids=ids, use_cache=False)
        else:
            out = llmcompile.generate(model, ids, recipe, max_new_tokens=4,
                                      tokenizer=ByteTokenizer())
            tokens.append(out[0, n:].tolist())
    if args.save:
        llmcompile.save_artifacts(args.save)
    print(json.dumps({"tokens": tokens,
                      "stages": {k: v["count"] for k, v in stages.table().items()}}))


if __name__ == "__main__":
    main()
