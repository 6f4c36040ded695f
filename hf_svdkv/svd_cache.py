"""`SVDCompressedCache`: a transformers `Cache` whose layers hold low-rank latents instead of full keys and values.

As in transformers' `cache_utils.py`: a per-layer storage class (`SVDCacheLayer`) and a thin container that dispatches
by layer. How latents are stored (model dtype, integer codes) is the layer's `LatentStore` (`latents.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .bases import SVDBases
from .compression_config import check_latent_bits, check_window
from .growing import Buffer, append_along, held_nbytes
from .latents import LatentStore, Stored, latent_store
from .projection import LayerBases, Projection

# The model attribute `patch_model` puts the patched model's CacheSettings under, for `SVDCompressedCache(model)`.
SETTINGS_ATTRIBUTE = "_hf_svdkv_cache_settings"


@dataclass(frozen=True)
class CacheSettings:
    """What a cache for a patched model is built with: its bases and how they are used."""

    bases: SVDBases
    window: int = 0
    latent_bits: int | None = None
    exact_prefill: bool = True
    sinks: int = 0


def cache_settings(model: nn.Module) -> CacheSettings | None:
    """The settings `patch_model` left on `model`, or None for an unpatched model."""
    return model.__dict__.get(SETTINGS_ATTRIBUTE)


@dataclass
class ExactTokens:
    """The full-precision copies a query may read instead of latents: the sinks (the first tokens), then the window's
    tail. `keys` (pre-RoPE) and `values` [batch, kv_heads, n, head_dim]; `index` [n] the token each column is."""

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor


class SVDCacheLayer(CacheLayerMixin):
    """One layer's compressed KV. `keys` (a `LatentStore` of [batch, groups, seq, key_rank]) are latents of keys
    *before* RoPE, so `positions` [batch, seq] keeps the position each token was written at (rows differ under left
    padding); `values` [batch, groups, seq, value_rank] are value latents. With a window W > 0 the last W tokens also
    stay at full precision in `recent_keys` / `recent_values` [batch, kv_heads, W, head_dim] (pre-RoPE) and become
    latents only as they age out; with `sinks` S > 0 the first S tokens stay at full precision for good in
    `sink_keys` / `sink_values` (attention sinks: most queries read them heavily). `positions` covers every token.

    A query reads a token's exact copy if it is a sink or less than W tokens old, its latent otherwise. `update`
    returns keys and values for the whole sequence as latents rebuilt, followed by the exact copies (`exact_index`
    says which tokens they are); the attention's mask decides which copy each query reads."""

    is_compileable = False
    is_sliding = False

    def __init__(
        self, bases: LayerBases, head_dim: int, window: int = 0, latent_bits: int | None = None, sinks: int = 0
    ):
        super().__init__()
        self.bases = bases
        self.head_dim = head_dim
        self.window = window
        self.latent_bits = latent_bits
        self.sinks = sinks
        self.keys: LatentStore | None = None
        self.values: LatentStore | None = None
        self.positions: torch.Tensor | None = None
        self.recent_keys: torch.Tensor | None = None
        self.recent_values: torch.Tensor | None = None
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.exact_index: torch.Tensor | None = None  # tokens of the exact columns `update` returned last
        self._positions_buffer: Buffer | None = None
        self.store_options: dict = {}  # for the latent stores (e.g. {"rotate": False}), read at lazy init

    @property
    def is_croppable(self) -> bool:
        # Cropping past the window would leave latents where full-precision tokens were.
        return self.window == 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Projections run in float32 (or the bases' own wider dtype) whatever the model dtype: the latents are
        # rounded once, when stored, like a 16-bit DynamicCache rounds its keys once.
        compute_dtype = torch.promote_types(self.bases.key.down.dtype, torch.float32)
        projection = self.bases.to(self.device, compute_dtype)
        batch = key_states.shape[0]
        self.keys, self.values = (
            latent_store(self.latent_bits, batch, p.num_groups, p, self.dtype, self.device, **self.store_options)
            for p in (projection.key, projection.value)
        )
        self.projection = LayerBases(self.keys.prepare(projection.key), self.values.prepare(projection.value))
        # Empty tensors of their own: a zero-length view of the states would keep a prefill's full-size keys alive.
        self.recent_keys = self.sink_keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.recent_values = self.sink_values = value_states.new_empty(
            (*value_states.shape[:2], 0, value_states.shape[-1])
        )
        self.positions = torch.zeros((batch, 0), dtype=torch.int32, device=self.device)
        self._positions_buffer = None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new pre-RoPE keys and values; return all of them rebuilt, then the exact copies (the reference
        path of `attention.py`: everything at full size)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        dtype = self.projection.key.up.dtype
        old_keys, old_values = self.keys.read(dtype=dtype), self.values.read(dtype=dtype)
        exact_keys, exact_values, new_keys, new_values = self._store(key_states, value_states, positions)
        rebuilt = []
        for projection, store, old, new in (
            (self.projection.key, self.keys, old_keys, new_keys),
            (self.projection.value, self.values, old_values, new_values),
        ):
            latents = torch.cat([old, store.decode(new, old.dtype)], dim=-2)
            rebuilt.append(projection.decode(latents, self.head_dim).to(self.dtype))
        exact = self._exact_tokens(exact_keys, exact_values)
        self.exact_index = exact.index if exact is not None else self.positions.new_zeros(0, dtype=torch.long)
        if exact is None:
            return rebuilt[0], rebuilt[1]
        return torch.cat([rebuilt[0], exact.keys], dim=-2), torch.cat([rebuilt[1], exact.values], dim=-2)

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor
    ) -> ExactTokens | None:
        """Store the new pre-RoPE keys and values without rebuilding anything (the latent attention path).

        Returns the exact copies `update` would append (the sinks, then the window before this call and the new
        tokens), or None without sinks or a window. Stores exactly what `update` stores."""
        exact_keys, exact_values, _, _ = self._store(key_states, value_states, positions, encode_exact=False)
        return self._exact_tokens(exact_keys, exact_values)

    def _exact_tokens(self, tail_keys: torch.Tensor, tail_values: torch.Tensor) -> ExactTokens | None:
        """The sinks, then the tail of the exact span `_store` returned (tokens already among the sinks left out)."""
        total, sinks = self.get_seq_length(), self.sink_keys.shape[-2]
        tail = tail_keys.shape[-2] if self.window else 0
        skip = min(max(sinks - (total - tail), 0), tail)  # tail tokens that are sinks: read from the sink copy
        if not sinks and not tail:
            return None
        device = self.positions.device
        index = torch.cat([torch.arange(sinks, device=device), torch.arange(total - tail + skip, total, device=device)])
        if not tail:
            return ExactTokens(self.sink_keys, self.sink_values, index)
        if not sinks:
            return ExactTokens(tail_keys, tail_values, index)
        keys = torch.cat([self.sink_keys, tail_keys[..., skip:, :]], dim=-2)
        return ExactTokens(keys, torch.cat([self.sink_values, tail_values[..., skip:, :]], dim=-2), index)

    def _store(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor, encode_exact: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, Stored | None, Stored | None]:
        """Store new tokens: (exact keys, exact values, their encoded key latents, their encoded value latents). The
        latents cover the whole exact span, or with `encode_exact=False` only the tokens that age out of it (None
        when none does)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.projection.key.down.is_inference() and not torch.is_inference_mode_enabled():
            # Bases made or moved under torch.inference_mode are inference tensors, which autograd may not save.
            self.projection = LayerBases(
                *(
                    Projection(*(t.clone() for t in (p.down, p.up, p.center)), p.channel_bits)
                    for p in (self.projection.key, self.projection.value)
                )
            )
        start = self.get_seq_length()
        self.positions, self._positions_buffer = append_along(
            self._positions_buffer, self.positions, positions.to(self.device, torch.int32), dim=-1
        )
        if self.sinks and (held := self.sink_keys.shape[-2]) == start:
            # Sinks are each row's first tokens (positions below `sinks`; with left padding, after the padding). Exact
            # copies are kept for good of the leading slots that hold a sink in some row. Copies, not views.
            is_sink = (self.positions[:, held:] < self.sinks).any(0)
            take = int(is_sink.numel() if is_sink.all() else is_sink.int().argmin())
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :take, :]], dim=-2)
        if self.recent_keys.shape[-2]:
            exact_keys = torch.cat([self.recent_keys, key_states], dim=-2)
            exact_values = torch.cat([self.recent_values, value_states], dim=-2)
        else:  # no window (or an empty one): the new tokens are the whole exact span
            exact_keys, exact_values = key_states, value_states
        aged = max(exact_keys.shape[-2] - self.window, 0)
        # `update` rebuilds the whole exact span from its latents; `append` only stores those of the tokens ageing out
        # (a decoding step with a window: one token of the window's 129, each encoded by a dozen small ops).
        encoded = exact_keys.shape[-2] if encode_exact else aged
        new_keys = new_values = None
        if encoded:
            new_keys = self.keys.encode(self.projection.key.encode(exact_keys[..., :encoded, :]))
            new_values = self.values.encode(self.projection.value.encode(exact_values[..., :encoded, :]))
        if aged:
            self.keys.append(new_keys, aged)
            self.values.append(new_values, aged)
        # A slice would keep the whole span's storage alive (a prefill's full-size keys and values): keep a copy.
        self.recent_keys, self.recent_values = (
            t[..., aged:, :].clone() if aged else t for t in (exact_keys, exact_values)
        )
        return exact_keys, exact_values, new_keys, new_values

    def key_positions(self) -> torch.Tensor:
        """Positions of the columns `update` returned: every token, then the exact copies again."""
        return torch.cat([self.positions, self.positions[:, self.exact_index]], dim=-1)

    def sink_flags(self, index: torch.Tensor) -> torch.Tensor | None:
        """Which of the tokens `index` [n] are sinks, per row: [batch, n] bool (a token held as an exact sink copy and
        written at a position below `sinks`), or None without sinks."""
        if not self.sinks:
            return None
        index = index.to(self.positions.device)
        return (self.positions[:, index] < self.sinks) & (index < self.sink_keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.positions.shape[-1] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # Sequence and batch operations: one function mapped over every stored tensor.
    def _map_batch(self, fn) -> None:
        self.keys.map(fn)
        self.values.map(fn)
        for name in ("recent_keys", "recent_values", "sink_keys", "sink_values", "positions"):
            setattr(self, name, fn(getattr(self, name)))
        self._positions_buffer = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        # The newest tokens go first from the window, then from the latents.
        remove = min(-tokens_to_remove, self.get_seq_length())
        from_recent = min(remove, self.recent_keys.shape[-2])
        keep_recent = self.recent_keys.shape[-2] - from_recent
        self.recent_keys, self.recent_values = (
            self.recent_keys[..., :keep_recent, :],
            self.recent_values[..., :keep_recent, :],
        )
        keep_latent = self.keys.length - (remove - from_recent)
        self.keys.crop(keep_latent)
        self.values.crop(keep_latent)
        keep = self.positions.shape[-1] - remove
        self.sink_keys, self.sink_values = self.sink_keys[..., :keep, :], self.sink_values[..., :keep, :]
        self.positions = self.positions[..., :keep]
        self._positions_buffer = None  # the next token must not overwrite, in place, tokens an older view still shows

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.positions.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.recent_keys = self.recent_values = None
        self.sink_keys = self.sink_values = self.exact_index = None
        self._positions_buffer = None
        self.is_initialized = False

    def nbytes(self) -> int:
        """Bytes held: key and value latents (integer codes with their scales and zero points when quantized), the
        full-precision window and sinks, and positions, with the spare room their buffers keep for the next tokens."""
        if not self.is_initialized:
            return 0
        exact_copies = (self.recent_keys, self.recent_values, self.sink_keys, self.sink_values)
        exact = sum(t.numel() * t.element_size() for t in exact_copies)
        positions = held_nbytes(self.positions, self._positions_buffer)
        return self.keys.nbytes() + self.values.nbytes() + exact + positions


class SVDCompressedCache(Cache):
    """A KV cache storing pre-RoPE key latents (with their positions) and value latents for every layer.

    Build it from a model patched with `patch_model` (it takes the model's bases and settings), or from `bases`
    directly. Only a patched model can fill it: its attention hands over keys before RoPE, which stock attention
    cannot. `window`, `latent_bits`, `exact_prefill` and `sinks` default to the patched model's (else 0, None,
    True, 0).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        bases: SVDBases | None = None,
        window: int | None = None,
        latent_bits: int | None = None,
        exact_prefill: bool | None = None,
        sinks: int | None = None,
    ):
        settings = cache_settings(model) if model is not None else None
        if bases is None:
            if settings is None:
                raise ValueError(
                    "SVDCompressedCache needs a model patched with hf_svdkv.patch_model (or explicit bases=): "
                    "an unpatched model stores keys after RoPE, which this cache cannot compress"
                )
            bases = settings.bases
        defaults = settings or CacheSettings(bases)
        window = defaults.window if window is None else window
        latent_bits = defaults.latent_bits if latent_bits is None else latent_bits
        exact_prefill = defaults.exact_prefill if exact_prefill is None else exact_prefill
        sinks = defaults.sinks if sinks is None else sinks
        check_window(window)
        check_window(sinks, "sinks")
        check_latent_bits(latent_bits)
        self.bases = bases
        self.window = window
        self.latent_bits = latent_bits
        # A prompt (a forward into the empty cache) attends over its exact keys and values; see CompressionConfig.
        self.exact_prefill = exact_prefill
        self.sinks = sinks
        self.checked_against: set[int] = set()
        head_dim = bases.geometry.head_dim
        super().__init__(layers=[SVDCacheLayer(layer, head_dim, window, latent_bits, sinks) for layer in bases.layers])

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args,
        positions: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            raise RuntimeError(
                f"SVDCompressedCache was filled by an attention layer hf_svdkv has not patched (layer {layer_idx}): "
                "stock attention hands over keys after RoPE, which would be compressed wrongly. "
                "Call hf_svdkv.patch_model(model) before using this cache."
            )
        return super().update(key_states, value_states, layer_idx, *args, positions=positions, **kwargs)

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache (latents, window, sinks and positions)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes held per cached token and batch row (0 when empty)."""
        first = self.layers[0]
        tokens = first.get_seq_length() * (first.positions.shape[0] if first.is_initialized else 0)
        return self.nbytes() / tokens if tokens else 0.0
