"""SinkCache: eviction order, rotary positions after wrap-around, equality with dense references
(below and beyond the window), constant memory, ``generate`` and a compiled decode loop."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import llmcompile
from llmcompile import _compat
from llmcompile.deploy.sink_cache import SinkCache
from llmcompile.tools.models import tiny_config, tiny_model

WINDOW, SINKS = 6, 2
CAP = SINKS + WINDOW  # slots per layer


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[1, n]`` (avoiding bos/eos)."""
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _forward(model, forward, cache, ids: torch.Tensor, start: int, **kwargs) -> torch.Tensor:
    """Logits ``[1, n, V]`` of ``ids`` at positions ``start...``, through ``cache``."""
    positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return forward(input_ids=ids, position_ids=positions, use_cache=True,
                       **{_compat.cache_kwarg(model): cache}, **kwargs).logits


def _decode(model, cache, ids: torch.Tensor, start: int, forward=None) -> list[torch.Tensor]:
    """Feed ``ids[:, start:]`` token by token; the logits of each step ``[1, 1, V]``."""
    forward = forward or model.forward
    return [_forward(model, forward, cache, ids[:, t:t + 1], t) for t in range(start, ids.shape[1])]


def _run(model, cache, ids: torch.Tensor, prompt: int, forward=None) -> torch.Tensor:
    """Prefill ``ids[:, :prompt]`` in one forward, then decode the rest token by token; the
    logits of every position ``[1, T, V]``."""
    prefill = _forward(model, forward or model.forward, cache, ids[:, :prompt], 0)
    return torch.cat([prefill, *_decode(model, cache, ids, prompt, forward)], dim=1)


def _feed_positions(chunks: list[int]) -> SinkCache:
    """A cache fed states whose every entry is the token's absolute position, in ``chunks``."""
    cache = SinkCache(WINDOW, SINKS, config=tiny_config("llama"))
    start = 0
    for n in chunks:
        states = torch.arange(start, start + n, dtype=torch.float).view(1, 1, n, 1)
        states = states.expand(1, 2, n, 16).clone()  # [B, H, n, E]
        cache.update(states, states.clone(), 0)
        start += n
    return cache


@pytest.mark.parametrize("chunks", [[1] * 23, [23], [5, 1, 1, 16], [3, 20], [CAP, 1, 14]])
def test_eviction_keeps_sinks_and_last_window(chunks):
    total = sum(chunks)
    cache = _feed_positions(chunks)
    kept = cache.slot_positions()
    expected = set(range(SINKS)) | set(range(total - WINDOW, total))
    assert sorted(kept.tolist()) == sorted(expected)
    # values are stored unrotated: each slot holds the token it claims
    torch.testing.assert_close(cache.layers[0].values[0, 0, :, 0], kept.float())
    # token-by-token and chunked feeding leave the same buffers
    one_by_one = _feed_positions([1] * total).layers[0]
    torch.testing.assert_close(cache.layers[0].keys, one_by_one.keys)
    torch.testing.assert_close(cache.layers[0].values, one_by_one.values)


def test_not_yet_full_slots_are_positions():
    cache = _feed_positions([3, 1])
    assert cache.slot_positions().tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert int(cache.get_seq_length()) == 4


def _layer0_keys(model, ids: torch.Tensor, positions: torch.Tensor):
    """Layer-0 keys and values of ``ids`` rotated at ``positions`` ``[1, Hkv, n, E]``,
    computed densely from the embeddings (layer 0 sees no context)."""
    attn, layer = model.model.layers[0].self_attn, model.model.layers[0]
    hidden = layer.input_layernorm(model.model.embed_tokens(ids))  # [1, n, D]
    shape = (*ids.shape, -1, attn.head_dim)
    keys = attn.k_proj(hidden).view(shape).transpose(1, 2)  # [1, Hkv, n, E]
    values = attn.v_proj(hidden).view(shape).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, positions.unsqueeze(0))
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1], values


def test_positions_after_wrap_around(model):
    ids = _ids(3 * CAP + 1)
    cache = SinkCache(WINDOW, SINKS, config=model)
    _run(model, cache, ids, prompt=5)
    tokens, rotary = cache.slot_positions(), cache.key_positions()
    shift = ids.shape[1] - CAP
    # sinks sit right before the oldest window token; window tokens keep their positions
    assert rotary[:SINKS].tolist() == [shift + s for s in range(SINKS)]
    assert torch.equal(rotary[SINKS:], tokens[SINKS:])
    with torch.no_grad():
        keys, values = _layer0_keys(model, ids[:, tokens], rotary)
    torch.testing.assert_close(cache.layers[0].keys, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.layers[0].values, values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt", [3, 2 * CAP + 3])
def test_matches_dense_cache_until_eviction(model, prompt):
    """Up to ``CAP`` tokens nothing is evicted; a longer prompt is still prefilled densely."""
    ids = _ids(max(prompt, CAP))
    sink = _run(model, SinkCache(WINDOW, SINKS, config=model.config), ids, prompt)
    dense = _run(model, DynamicCache(config=model.config), ids, prompt)
    torch.testing.assert_close(sink, dense, atol=1e-5, rtol=1e-5)


def _grab_sink_keys(store: dict, index: int, head_dim: int, module, args, output) -> None:
    """Forward hook on ``k_proj`` (first call: the prefill): the unrotated keys of the sinks
    ``[1, Hkv, SINKS, E]``."""
    if index not in store:
        keys = output.view(*output.shape[:2], -1, head_dim).transpose(1, 2)  # [1, Hkv, n, E]
        store[index] = keys[:, :, :SINKS]


def _dense_reference(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits with a DynamicCache holding every token, a 4D mask keeping the sinks and the last
    WINDOW positions, and the sinks rotated (by the model's rotary) to sit right before the
    oldest kept token: what SinkCache promises, computed without it (sdpa attention, which
    reads the boolean mask as keep/drop)."""
    raw: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        grab = partial(_grab_sink_keys, raw, i, layer.self_attn.head_dim)
        hooks.append(layer.self_attn.k_proj.register_forward_hook(grab))
    cache = DynamicCache(config=model.config)
    try:
        out = [_forward(model, model.forward, cache, ids[:, :prompt], 0)]
    finally:
        for hook in hooks:
            hook.remove()
    for t in range(prompt, ids.shape[1]):
        shift = max(0, t + 1 - CAP)
        cos, sin = model.model.rotary_emb(raw[0], (torch.arange(SINKS) + shift).unsqueeze(0))
        for i, layer in enumerate(cache.layers):
            layer.keys[:, :, :SINKS] = apply_rotary_pos_emb(raw[i], raw[i], cos, sin)[1]
        j = torch.arange(t + 1)
        mask = ((j < SINKS) | (j > t - WINDOW)).view(1, 1, 1, t + 1)  # [B, 1, q, kv]
        out.append(_forward(model, model.forward, cache, ids[:, t:t + 1], t, attention_mask=mask))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("prompt", [4, CAP + 3])
def test_matches_masked_dense_reference_past_window(model, prompt):
    ids = _ids(prompt + 3 * CAP, seed=1)
    with torch.no_grad():
        expected = _dense_reference(model, ids, prompt)
    got = _run(model, SinkCache(WINDOW, SINKS, config=model.config), ids, prompt)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_memory_is_constant(model):
    ids = _ids(10 * CAP)
    cache = SinkCache(WINDOW, SINKS, config=model.config)
    _run(model, cache, ids[:, :CAP], prompt=2)
    full = cache.nbytes()
    heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    head_dim = model.model.layers[0].self_attn.head_dim
    assert full == layers * heads * head_dim * 4 * (2 * CAP + SINKS)  # fp32 keys, values, sinks
    _decode(model, cache, ids, CAP)
    assert int(cache.get_seq_length()) == 10 * CAP
    assert cache.nbytes() == full


def _generate(model, ids: torch.Tensor, cache, new_tokens: int):
    """Greedy ``generate`` through ``cache``, with the logits of every step."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0, **{_compat.cache_kwarg(model): cache})


def test_generate_matches_dense_below_window(model):
    ids = _ids(3)
    sink = _generate(model, ids, SinkCache(WINDOW, SINKS, config=model.config), CAP - 3)
    dense = _generate(model, ids, DynamicCache(config=model.config), CAP - 3)
    torch.testing.assert_close(torch.stack(sink.logits), torch.stack(dense.logits),
                               atol=1e-5, rtol=1e-5)


def test_generate_runs_past_window(model):
    ids, new = _ids(4), 4 * CAP
    cache = SinkCache(WINDOW, SINKS, config=model.config)
    out = _generate(model, ids, cache, new)
    assert out.sequences.shape == (1, 4 + new)
    assert int(cache.get_seq_length()) == 4 + new - 1  # the last token is not fed back
    # generate's logits are those of a hand loop over the same tokens
    manual = _run(model, SinkCache(WINDOW, SINKS, config=model.config), out.sequences[:, :-1], 4)
    torch.testing.assert_close(torch.cat(out.logits), manual[0, 3:], atol=1e-5, rtol=1e-5)


def test_compiled_decode_does_not_recompile():
    model = tiny_model("llama")
    ids, prompt = _ids(4 * CAP, seed=2), 5
    eager = _run(model, SinkCache(WINDOW, SINKS, config=model.config), ids, prompt)
    model.forward = torch.compile(model.forward, backend="llmcompile",
                                  options={"recipe": "default"}, fullgraph=True)
    cache = SinkCache(WINDOW, SINKS, config=model.config)
    start = _compat.dynamo_counters()[0]
    out = [_forward(model, model.forward, cache, ids[:, :prompt], 0)]
    graphs = []
    for t in range(prompt, ids.shape[1]):  # decode well past the window (3 wrap-arounds)
        out.extend(_decode(model, cache, ids[:, :t + 1], t))
        graphs.append(_compat.dynamo_counters()[0])
    assert graphs[-1] - start <= 3, "prefill, first decode step, steady decode"
    assert graphs[-1] == graphs[1], "a decode step recompiled"
    torch.testing.assert_close(torch.cat(out, dim=1), eager, atol=1e-4, rtol=1e-4)


def test_crop_rolls_back_until_the_first_eviction(model):
    """Draft 3 wrong tokens, crop them, feed the right ones: the same logits as never having
    drafted (speculative decoding's rollback). After an eviction, crop is a clear error."""
    ids, wrong = _ids(CAP, seed=3), _ids(3, seed=4)
    want = _run(model, SinkCache(WINDOW, SINKS, config=model.config), ids, 4)
    cache = SinkCache(WINDOW, SINKS, config=model.config)
    got = [_forward(model, model.forward, cache, ids[:, :4], 0)]
    _forward(model, model.forward, cache, wrong, 4)
    cache.crop(-3)
    assert int(cache.get_seq_length()) == 4
    got += _decode(model, cache, ids, 4)
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=1e-5)
    assert not cache.is_croppable  # generate refuses assisted decoding up front
    _decode(model, cache, _ids(CAP + 2, seed=5), CAP)  # past the cache: tokens evicted
    with pytest.raises(ValueError, match="were evicted and the window before them is gone"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(2)


def test_bad_arguments():
    config = tiny_config("llama")
    with pytest.raises(ValueError, match="window must be >= 1"):
        SinkCache(0, config=config)
    with pytest.raises(ValueError, match="sink_tokens must be >= 0"):
        SinkCache(8, -1, config=config)
    with pytest.raises(ValueError, match="window must be an int"):
        SinkCache(8.0, config=config)
    with pytest.raises(ValueError, match="needs the model's config"):
        SinkCache(8, 4)
    with pytest.raises(ValueError, match="rotary embedding"):
        SinkCache(8, 4, config=tiny_config("gpt2"))


def test_facade_exports_sink_cache():
    assert llmcompile.SinkCache is SinkCache
    assert "SinkCache" in llmcompile.__all__
