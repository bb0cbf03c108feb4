"""Start-up: seconds from a loaded model to the first N generated tokens, from a fresh process.

    python benchmarks/startup.py --recipe default            # llmcompile.generate
    python benchmarks/startup.py --recipe int4 --prompt-tokens 1
    python benchmarks/startup.py --anchor                    # plain torch.compile, HF generate
    python benchmarks/startup.py --model tinyllama --recipe int4   # random 1.1B Llama shape

Prints one JSON line: load seconds, seconds to N tokens (compile + calibration included), the
peak RSS of the process, and llmcompile's stage table. Run it twice with the same
``TORCHINDUCTOR_CACHE_DIR`` / ``LLMCOMPILE_CACHE_DIR`` for the warm figure (what a user's
second process sees); point them at empty folders for the cold one.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _load(name: str):
    from llmcompile.tools.models import load_smollm2

    if name == "smollm2":
        return load_smollm2()
    from llmcompile.tools.models import scale_model

    return scale_model(name)


def _generate(model, tokenizer, ids: torch.Tensor, args) -> None:
    """``args.new_tokens`` greedy tokens: HF generate (static cache) for the anchor, else
    ``llmcompile.generate``."""
    if args.anchor:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                           cache_implementation="static")
        return
    import llmcompile

    llmcompile.generate(model, ids, args.recipe, max_new_tokens=args.new_tokens,
                        tokenizer=tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tinyllama or gemma3-270m")
    p.add_argument("--recipe", default="default")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=11)
    p.add_argument("--second-prompt", type=int, default=0,
                   help="then generate after a prompt of this length, and time it apart")
    p.add_argument("--decode", type=int, default=0,
                   help="then time a warm generation of this many tokens (tokens/s)")
    p.add_argument("--anchor", action="store_true",
                   help="plain torch.compile (Inductor) under HF generate, static cache")
    args = p.parse_args()

    start = time.perf_counter()
    model, tokenizer = _load(args.model)
    loaded = time.perf_counter() - start
    rss_loaded = _peak_rss_gb()
    text = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. " * 40)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    start = time.perf_counter()
    result = {"model": args.model, "recipe": "anchor" if args.anchor else args.recipe,
              "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens}
    if args.anchor:
        model.forward = torch.compile(model.forward)
    _generate(model, tokenizer, ids, args)
    if not args.anchor:
        from llmcompile.core.stages import table

        result["stages"] = table()
    result["load_s"] = round(loaded, 2)
    result["first_tokens_s"] = round(time.perf_counter() - start, 2)
    if args.second_prompt:
        start = time.perf_counter()
        _generate(model, tokenizer, tokenizer(text, return_tensors="pt").input_ids[
            :, : args.second_prompt], args)
        result["second_prompt_s"] = round(time.perf_counter() - start, 2)
    if args.decode and not args.anchor:
        import llmcompile

        _, stats = llmcompile.generate(model, ids, args.recipe, max_new_tokens=args.decode,
                                       tokenizer=tokenizer, return_stats=True)
        result["decode_tok_s"] = round(stats.tokens_per_s, 1)
    result["rss_loaded_gb"] = round(rss_loaded, 3)
    result["peak_rss_gb"] = round(_peak_rss_gb(), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
