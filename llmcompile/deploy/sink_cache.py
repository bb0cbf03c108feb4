"""``SinkCache``: a bounded KV cache (attention sinks + a sliding-window ring buffer) for
Hugging Face ``generate`` and for a forward compiled by llmcompile.

    cache = SinkCache(window=512, sink_tokens=4, config=model.config)
    out = model.generate(ids, max_new_tokens=4096, past_key_values=cache)   # or cache=cache

Each layer keeps ``sink_tokens + window`` slots (StreamingLLM): the first ``sink_tokens`` tokens
of the sequence (the attention sinks) and a ring buffer of the last ``window`` ones, so memory
stays constant however long the generation. Buffers are allocated on the first update (they
learn batch, heads, head size, dtype and device there) and written in place with fixed shapes,
so a compiled decode step is one graph whatever the position.

Positions (rotary). Transformers rotates keys before ``Cache.update``, so keys are stored
rotated. Queries and window keys keep the absolute positions ``generate`` passes; the sinks are
re-rotated (from their original keys, so errors do not accumulate) to sit right before the
oldest kept window token: after ``n`` tokens, sink ``s`` is at position ``max(0, n - C) + s``
(``C = sink_tokens + window``). Relative distances are then exactly StreamingLLM's "positions
within the cache": the newest query is ``C - 1 - s`` from sink ``s``, never further, however
long the generation. Re-rotation needs the model's rotary frequencies, hence ``config``.

Prefill. A multi-token forward (the prompt, or a later chunk) attends densely: causally to
everything the cache held before it plus the whole chunk; only then are the sinks and the last
``window`` positions kept. A prompt longer than the cache is thus read like a dense cache reads
it, and eviction starts with the next step. A single-token step attends to exactly the sinks and
the last ``window`` positions (itself included).

Masks. The model builds its usual causal mask over *cache slots*, not absolute positions:
``get_mask_sizes`` gives ``C`` keys for a one-token step (the buffer itself, in ring order) and
``C + n`` for an ``n``-token chunk (laid out ``[held, chunk, empty]``); ``get_query_offset`` is
``min(seen, C)``, so each query sees the filled slots and no empty one. ``get_seq_length`` stays
the absolute count (``generate`` slices its inputs and positions with it).

Limits: batches without padding (a 2D padding mask is read by slot, which is only right before
the window wraps); the ``sdpa`` and ``eager`` attentions; decoders whose layers are all full
attention with ``rotate_half`` rotary (Llama, Mistral, Qwen2, Gemma, Phi-3, ...) and whose
rotary frequencies do not depend on the position (not ``dynamic``/``longrope``). ``crop`` (rolling
back tokens) works only until the first eviction, since evicted tokens are gone; so the cache
says it is not croppable and ``generate`` refuses assisted decoding with it up front.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.utils import is_torchdynamo_compiling

__all__ = ["SinkCache", "SinkCacheLayer"]

# rope types whose frequencies change with the absolute position: a kept key would no longer
# match the query's frequencies once the sequence passes the original context
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


def _text_config(config: Any) -> Any:
    """The decoder config of a config or of a model (anything with ``.config``)."""
    config = getattr(config, "config", config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def _check_layers(config: Any) -> int:
    """The number of decoder layers, checking that all of them are full attention."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and any(kind != "full_attention" for kind in kinds):
        raise ValueError(f"SinkCache supports decoders whose layers are all full attention; "
                         f"this config has layer_types {sorted(set(kinds))}")
    if kinds is None and getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"SinkCache does not combine with the model's own sliding window "
                         f"(sliding_window={config.sliding_window}): load it with "
                         f"sliding_window=None")
    return int(config.num_hidden_layers)


def _rope_frequencies(config: Any) -> torch.Tensor:
    """The model's rotary inverse frequencies ``[R/2]`` (``R`` rotated channels per head)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ValueError(f"SinkCache re-rotates the sink keys with the model's rotary embedding; "
                         f"model type {getattr(config, 'model_type', '?')!r} has none "
                         f"(rope_parameters={params!r})")
    rope_type = params.get("rope_type", "default")
    if rope_type in _POSITION_DEPENDENT_ROPE:
        raise ValueError(f"SinkCache needs rotary frequencies that do not depend on the "
                         f"position; rope_type {rope_type!r} rescales them past the context")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)[0].float()
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * (factor or 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def _rotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated ``delta`` positions further, in the ``rotate_half`` convention.

    ``keys`` [B, H, S, E] are already rotated; rotations compose, so rotating by ``delta`` moves
    them to ``position + delta``. Only the first ``R = 2 * len(inv_freq)`` channels rotate
    (partial rotary), and cos/sin carry no attention scaling: the stored keys already do.
    """
    rot = 2 * inv_freq.shape[0]
    freqs = delta.to(torch.float32) * inv_freq  # [R/2]
    emb = torch.cat((freqs, freqs))  # [R]
    cos, sin = emb.cos(), emb.sin()
    head = keys[..., :rot].to(torch.float32)  # [B, H, S, R]
    lo, hi = head.chunk(2, dim=-1)
    turned = head * cos + torch.cat((-hi, lo), dim=-1) * sin
    return torch.cat((turned.to(keys.dtype), keys[..., rot:]), dim=-1)


def _slot_positions(seen: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Absolute position of the token each slot holds after ``seen`` tokens, -1 if empty ``[C]``.

    Slot ``c < sink_tokens`` holds token ``c``; position ``p >= sink_tokens`` goes to ring slot
    ``sink_tokens + (p - sink_tokens) % window``, so ring slot ``c`` holds the latest
    ``p <= seen - 1`` with ``p = c (mod window)``.
    """
    slots = torch.arange(sink_tokens + window, device=seen.device)
    last = seen - 1
    ring = last - torch.remainder(last - slots, window)
    is_sink = slots < sink_tokens
    filled = torch.where(is_sink, slots < seen, ring >= sink_tokens)
    return torch.where(filled, torch.where(is_sink, slots, ring), -1)


class SinkCacheLayer(CacheLayerMixin):
    """One decoder layer of a :class:`SinkCache`: ``sink_tokens + window`` slots, in place.

    ``keys``/``values`` [B, H, C, E]: slots ``[0, sink_tokens)`` hold the sinks (keys re-rotated
    for the current shift), the rest a ring buffer. ``sink_keys`` [B, H, sink_tokens, E] keeps
    the sinks' keys as the model rotated them, ``seen`` counts every token so far (a tensor, so a
    compiled step reads it without guarding on its value).
    """

    is_compileable = True
    is_croppable = False
    is_sliding = False  # the mask is the plain causal one over slots, see the module docstring

    def __init__(self, window: int, sink_tokens: int, inv_freq: torch.Tensor):
        super().__init__()
        self.window, self.sink_tokens = window, sink_tokens
        self.max_cache_len = sink_tokens + window
        self.inv_freq = inv_freq
        self.sink_keys: torch.Tensor | None = None
        self.seen = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers from the first states' batch, heads, head sizes, dtype, device."""
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = key_states.new_zeros((*shape, key_states.shape[-1]))  # [B, H, C, Ek]
        self.values = value_states.new_zeros((*shape, value_states.shape[-1]))  # [B, H, C, Ev]
        self.sink_keys = key_states.new_zeros(
            (self.batch_size, self.num_heads, self.sink_tokens, key_states.shape[-1]))
        self.seen = self.seen.to(self.device)
        self.inv_freq = self.inv_freq.to(self.device)
        if not is_torchdynamo_compiling():  # fixed addresses (cudagraphs); not while tracing
            for buffer in (self.keys, self.values, self.sink_keys, self.seen):
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (rotated) states; return the keys and values the queries attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            return self._append_one(key_states, value_states)
        return self._append_many(key_states, value_states)

    def _append_one(self, key: torch.Tensor, value: torch.Tensor):
        """A decode step: write one slot in place, return the whole buffer (static shapes)."""
        seen, k = self.seen, self.sink_tokens
        slot = torch.where(seen < k, seen, k + torch.remainder(seen - k, self.window))
        self.keys.index_copy_(2, slot.view(1), key)  # key [B, H, 1, E]
        self.values.index_copy_(2, slot.view(1), value)
        if k:
            self._store_sinks(key, seen)
            self._refresh_sinks(seen + 1)
        self.seen.add_(1)
        return self.keys, self.values

    def _append_many(self, keys: torch.Tensor, values: torch.Tensor):
        """A chunk of ``n`` tokens: attend densely to what is held plus the chunk, then evict."""
        n, cap = keys.shape[-2], self.max_cache_len
        before, after = self.seen, self.seen + n
        all_keys = torch.cat((self.keys, keys), dim=2)  # [B, H, C + n, E]
        all_values = torch.cat((self.values, values), dim=2)
        # what the chunk attends to, laid out [held F, chunk n, empty C - F]: filled slots are
        # the first F = min(seen, C) ones, so the causal mask from offset F sees no empty slot
        held = torch.clamp(before, max=cap)
        j = torch.arange(cap + n, device=keys.device)
        order = torch.where(j < held, j, torch.where(j < held + n, cap + j - held, j - n))
        out_keys, out_values = all_keys.index_select(2, order), all_values.index_select(2, order)
        # what each slot holds afterwards: its latest token, from the chunk when that is new
        pos = _slot_positions(after, self.sink_tokens, self.window)  # [C]
        source = torch.where(pos >= before, cap + pos - before, torch.arange(cap, device=j.device))
        self.keys.copy_(all_keys.index_select(2, source))
        self.values.copy_(all_values.index_select(2, source))
        if self.sink_tokens:
            self._store_sinks(keys, before)
            self._refresh_sinks(after)
        self.seen.add_(n)
        return out_keys, out_values

    def _store_sinks(self, keys: torch.Tensor, before: torch.Tensor) -> None:
        """Keep the original keys of the sinks among ``keys`` (positions ``before`` onwards)."""
        k, n = self.sink_tokens, keys.shape[-2]
        slots = torch.arange(k, device=keys.device)
        is_new = (slots >= before) & (slots < before + n)
        source = torch.where(is_new, k + slots - before, slots)
        self.sink_keys.copy_(torch.cat((self.sink_keys, keys), dim=2).index_select(2, source))

    def _refresh_sinks(self, seen: torch.Tensor) -> None:
        """Rotate the sinks to sit right before the oldest kept window token."""
        shift = torch.clamp(seen - self.max_cache_len, min=0)  # tokens evicted so far
        self.keys[:, :, : self.sink_tokens].copy_(_rotate(self.sink_keys, shift, self.inv_freq))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys ``update`` returns, in slot space."""
        if query_length == 1:
            return self.max_cache_len, 0
        return self.max_cache_len + query_length, 0

    def query_offset(self) -> torch.Tensor:
        """Slot-space position of the first query: ``min(seen, C)`` (see ``get_mask_sizes``)."""
        return torch.clamp(self.seen, max=self.max_cache_len)

    def get_seq_length(self) -> torch.Tensor | int:
        """Tokens seen so far (absolute, not bounded by the cache)."""
        return self.seen.clone() if self.is_initialized else 0

    def get_max_length(self) -> int:
        """Slots held: ``sink_tokens + window``."""
        return self.max_cache_len

    def slot_positions(self) -> torch.Tensor:
        """Absolute position of the token in each slot, -1 where empty ``[C]``."""
        return _slot_positions(self.seen, self.sink_tokens, self.window)

    def key_positions(self) -> torch.Tensor:
        """Rotary position each slot's key carries now (sinks shifted), -1 where empty ``[C]``."""
        pos = self.slot_positions()
        shift = torch.clamp(self.seen - self.max_cache_len, min=0)
        is_sink = torch.arange(pos.shape[0], device=pos.device) < self.sink_tokens
        return torch.where(is_sink & (pos >= 0), pos + shift, pos)

    def reset(self) -> None:
        """Empty the cache, keeping the buffers (and their addresses)."""
        if self.is_initialized:
            for buffer in (self.keys, self.values, self.sink_keys):
                buffer.zero_()
        self.seen.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search), in place."""
        if self.is_initialized:
            for buffer in (self.keys, self.values, self.sink_keys):
                buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention: a negative
        count). Exact while nothing has been evicted (at most ``sink_tokens + window`` tokens
        seen): the slots past the new count read as empty and the next update overwrites
        them. Once tokens were evicted, the window before them cannot be restored: an error."""
        if tokens_to_remove > 0:
            raise ValueError(f"SinkCache.crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        seen = int(self.seen)
        if seen > self.max_cache_len:
            raise ValueError(f"SinkCache cannot roll back {-tokens_to_remove} token(s): after "
                             f"{seen} tokens, {seen - self.max_cache_len} were evicted and the "
                             f"window before them is gone (crop works up to "
                             f"{self.max_cache_len} tokens)")
        self.seen.fill_(max(seen + tokens_to_remove, 0))


def _check_sizes(window: Any, sink_tokens: Any) -> None:
    """Clear errors for sizes that cannot make a cache."""
    for name, value, least in (("window", window, 1), ("sink_tokens", sink_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"SinkCache: {name} must be an int, got {value!r}")
        if value < least:
            raise ValueError(f"SinkCache: {name} must be >= {least}, got {value}")


class SinkCache(Cache):
    """A transformers ``Cache`` of bounded size: ``sink_tokens`` attention sinks plus a ring
    buffer of the last ``window`` tokens per layer (StreamingLLM), usable with ``generate``
    (``past_key_values=`` or ``cache=``) and with a forward compiled by llmcompile.

    Args:
        window: tokens of recent context kept (>= 1).
        sink_tokens: first tokens always kept (>= 0); StreamingLLM uses 4.
        config: the model's config (or the model): its rotary frequencies re-rotate the sinks
            and its layer count sizes the cache.

    See the module docstring for the positions, prefill and mask design.
    """

    def __init__(self, window: int, sink_tokens: int = 4, *, config: Any = None):
        _check_sizes(window, sink_tokens)
        if config is None:
            raise ValueError(f"SinkCache needs the model's config: SinkCache(window={window}, "
                             f"sink_tokens={sink_tokens}, config=model.config); it re-rotates "
                             f"the sink keys with the model's rotary frequencies")
        text = _text_config(config)
        num_layers = _check_layers(text)
        inv_freq = _rope_frequencies(text)
        self.window, self.sink_tokens = window, sink_tokens
        super().__init__(layers=[SinkCacheLayer(window, sink_tokens, inv_freq.clone())
                                 for _ in range(num_layers)])

    def get_query_offset(self, layer_idx: int = 0) -> torch.Tensor:
        """Slot-space offset of the queries (the mask is built over slots, not positions)."""
        return self.layers[layer_idx].query_offset()

    def nbytes(self) -> int:
        """Bytes held by the buffers of every layer (constant once allocated)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values, layer.sink_keys))

    def slot_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Absolute position of the token each slot holds, -1 where empty ``[C]``."""
        return self.layers[layer_idx].slot_positions()

    def key_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Rotary position each slot's key carries (sinks shifted), -1 where empty ``[C]``."""
        return self.layers[layer_idx].key_positions()

    def __repr__(self) -> str:
        return (f"SinkCache(window={self.window}, sink_tokens={self.sink_tokens}, "
                f"layers={len(self.layers)})")
