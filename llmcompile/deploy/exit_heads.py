"""Distilled exit heads: a low-rank adapter per exit, trained so that the model's own final norm
and LM head, applied to ``h + (h @ down) @ up`` (``h``: the hidden state leaving the exit
layer), match the full model's next-token distribution (KL divergence).

Training runs the model once over the shipped calibration text (eagerly) to collect the exit
hidden states and the full model's log-probabilities, then fits ``down`` [H, r] and ``up``
[r, H] with Adam; ``up`` starts at zero, so training starts from the shared head. Seeded,
with a progress bar; a few minutes on a laptop CPU for a 135M model. The adapter is saved to
``early_exit.adapter`` when the recipe names a file, else to the cache folder
(``$LLMCOMPILE_CACHE_DIR`` or ``~/.cache/llmcompile``) under a key of the model's weights and
the exit, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.cache import cache_root

log = logging.getLogger("llmcompile")

__all__ = ["adapter_files", "adapter_path", "load_adapter", "train_adapter"]


def _inner(model):
    return getattr(model, "model", None) or getattr(model, "transformer", None)


def _final_norm(model):
    inner = _inner(model)
    return getattr(inner, "norm", None) or inner.ln_f


def _model_key(model) -> str:
    """A short hash of the model's config and a sample of its weights."""
    digest = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    for name, p in list(model.named_parameters())[::7]:
        flat = p.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // 512)].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_path(model, layer: int, rank: int, explicit: str = "") -> Path:
    """Where the adapter of ``layer`` lives: ``explicit`` (``{layer}`` is filled in) or the
    cache folder."""
    if explicit:
        return Path(explicit.format(layer=layer))
    return cache_root() / "exit-heads" / f"{_model_key(model)}-after{layer}-r{rank}.pt"


def load_adapter(path: str | Path, hidden: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` from a file written by :func:`train_adapter`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    down, up = data["down"], data["up"]
    if hidden is not None and down.shape[0] != hidden:
        raise ValueError(f"exit adapter {path} is for hidden size {down.shape[0]}, the model "
                         f"has {hidden}")
    return down, up


@torch.no_grad()
def _targets(model, tokens: torch.Tensor, layer: int, chunk: int):
    hiddens, logps = [], []
    for start in range(0, tokens.numel(), chunk):
        ids = tokens[start:start + chunk][None]
        out = model(ids, output_hidden_states=True, use_cache=False)
        hiddens.append(out.hidden_states[layer][0].float())
        logps.append(out.logits[0].float().log_softmax(-1))
    return torch.cat(hiddens), torch.cat(logps)


def train_adapter(model, tokens: torch.Tensor, layer: int, *, rank: int = 64, steps: int = 300,
                  batch: int = 256, lr: float = 2e-3, seed: int = 0, chunk: int = 256,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the adapter of the exit after ``layer`` layers on ``tokens`` (1-d ids).

    Gradients are enabled inside even when the caller decodes under ``torch.no_grad``; only the
    adapter is trained and the model's own ``requires_grad`` flags are left as they were."""
    from tqdm.auto import tqdm

    hidden, target = _targets(model, tokens, layer, chunk)
    generator = torch.Generator().manual_seed(seed)
    size = hidden.shape[-1]
    down = (torch.randn(size, rank, generator=generator) / size ** 0.5).requires_grad_()
    up = torch.zeros(rank, size, requires_grad=True)
    norm, head = _final_norm(model), model.get_output_embeddings()
    frozen = [p for p in (*norm.parameters(), *head.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam([down, up], lr=lr)
    bar = tqdm(range(steps), desc=f"distilling exit head after layer {layer}",
               disable=not progress)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in bar:
                pick = torch.randint(0, hidden.shape[0], (batch,), generator=generator)
                h = hidden[pick]
                logits = head(norm(h + (h @ down) @ up)).float()
                loss = F.kl_div(logits.log_softmax(-1), target[pick], log_target=True,
                                reduction="batchmean")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(kl=f"{loss.item():.3f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return down.detach(), up.detach()


def adapter_files(model, config: Any, tokenizer: Any, n_tokens: int = 8192) -> dict[int, str]:
    """Exit layer -> adapter file for every exit of ``config`` (an ``early_exit`` pass),
    training (and saving) the ones that do not exist yet on the shipped calibration text."""
    from ..quant.calibrate import calibration_tokens, load_tokenizer

    files: dict[int, str] = {}
    hidden = model.config.get_text_config(decoder=True).hidden_size
    for layer in config.layers:
        path = adapter_path(model, layer, config.rank, config.adapter)
        if not path.is_file():
            if tokenizer is None:
                raise ValueError("training a distilled exit head needs a tokenizer for the "
                                 "calibration text: pass tokenizer=")
            if isinstance(tokenizer, (str, Path)):
                tokenizer = load_tokenizer(tokenizer)
            log.warning("llmcompile: training the distilled exit head after layer %d "
                        "(rank %d) on the shipped calibration text; saved to %s", layer,
                        config.rank, path)
            tokens = calibration_tokens(tokenizer, None, n_tokens)
            down, up = train_adapter(model, tokens, layer, rank=config.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"down": down, "up": up, "layer": layer}, path)
        load_adapter(path, hidden)
        files[layer] = str(path)
    return files
