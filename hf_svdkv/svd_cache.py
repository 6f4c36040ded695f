"""`SVDCompressedCache`: a transformers `Cache` whose layers hold low-rank latents instead of full keys/values."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .bases import SVDBases
from .compression_config import check_latent_bits, check_window
from .growing import append_along, held_nbytes
from .projection import LayerBases, Projection


class SVDCacheLayer(DynamicLayer):
    """One layer's compressed KV. `keys` [batch, groups, seq, key_rank] are latents of keys *before* RoPE, so
    `positions` [batch, seq] keeps the position each token was written at (rows differ under left padding);
    `values` [batch, groups, seq, value_rank] are value latents. With a window W > 0 the last W tokens also
    stay at full precision in `recent_keys` / `recent_values` [batch, kv_heads, W, head_dim] (pre-RoPE) and
    become latents only as they age out. `positions` covers every token, latent or recent.

    `update` returns keys and values for the whole sequence as latents rebuilt, followed by `exact_tail`
    full-precision copies of the newest tokens; the attention's mask decides which copy each query reads."""

    is_compileable = False

    def __init__(self, bases: LayerBases, head_dim: int, window: int = 0):
        super().__init__()
        self.bases = bases
        self.head_dim = head_dim
        self.window = window
        self.positions: torch.Tensor | None = None
        self.recent_keys: torch.Tensor | None = None
        self.recent_values: torch.Tensor | None = None
        self.exact_tail = 0
        self._buffers: dict = {}  # what `keys`, `values` and `positions` are views of (growing.append_along)

    @property
    def is_croppable(self) -> bool:
        # Cropping past the window would leave latents where full-precision tokens were.
        return self.window == 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Projections run in float32 (or the bases' own wider dtype) whatever the model dtype: the latents are
        # rounded once, when stored, like a 16-bit DynamicCache rounds its keys once.
        compute_dtype = torch.promote_types(self.bases.key.down.dtype, torch.float32)
        self.projection = self.bases.to(self.device, compute_dtype)
        batch = key_states.shape[0]
        self.keys = key_states.new_zeros((batch, self.projection.key.num_groups, 0, self.projection.key.rank))
        self.values = value_states.new_zeros((batch, self.projection.value.num_groups, 0, self.projection.value.rank))
        self.recent_keys = key_states[:, :, :0]
        self.recent_values = value_states[:, :, :0]
        self.positions = torch.zeros((batch, 0), dtype=torch.int32, device=self.device)
        self._buffers = {}
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new pre-RoPE keys and values; return all of them rebuilt, then the exact tail."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_keys, old_values = self.keys, self.values
        exact_keys, exact_values, new_keys, new_values = self._store(key_states, value_states, positions)
        all_keys = self.projection.key.decode(self._all_latents(old_keys, new_keys), self.head_dim)
        all_values = self.projection.value.decode(self._all_latents(old_values, new_values), self.head_dim)
        if not self.exact_tail:
            return all_keys.to(self.dtype), all_values.to(self.dtype)
        keys = torch.cat([all_keys.to(self.dtype), exact_keys], dim=-2)
        return keys, torch.cat([all_values.to(self.dtype), exact_values], dim=-2)

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Store the new pre-RoPE keys and values without rebuilding anything (the latent attention path).

        Returns the exact span `update` would append as its tail (the window before this call, then the new
        tokens; pre-RoPE keys, values), or None without a window. Stores exactly what `update` stores."""
        exact_keys, exact_values, _, _ = self._store(key_states, value_states, positions)
        return (exact_keys, exact_values) if self.exact_tail else None

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor) -> tuple:
        """The storing half of `update`: (exact keys, exact values, their key latents, their value latents)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.projection.key.down.is_inference() and not torch.is_inference_mode_enabled():
            # Bases made or moved under torch.inference_mode are inference tensors, which autograd may not save.
            self.projection = LayerBases(*(Projection(*(t.clone() for t in (p.down, p.up, p.center))) for p in (self.projection.key, self.projection.value)))
        self.positions, self._buffers["positions"] = append_along(
            self._buffers.get("positions"), self.positions, positions.to(self.device, torch.int32), dim=-1
        )
        if self.recent_keys.shape[-2]:
            exact_keys = torch.cat([self.recent_keys, key_states], dim=-2)
            exact_values = torch.cat([self.recent_values, value_states], dim=-2)
        else:  # no window (or an empty one): the new tokens are the whole exact span
            exact_keys, exact_values = key_states, value_states
        # The whole exact span is encoded (not only the tokens ageing out): its latents are what `update` rebuilds.
        new_keys, new_values = self._encode(self.projection.key, exact_keys), self._encode(self.projection.value, exact_values)
        aged = max(exact_keys.shape[-2] - self.window, 0)
        self.keys = self._kept("keys", new_keys, aged)
        self.values = self._kept("values", new_values, aged)
        # A slice would keep the whole span's storage alive (a prefill's full-size keys and values): keep a copy.
        self.recent_keys, self.recent_values = (t[..., aged:, :].clone() if aged else t for t in (exact_keys, exact_values))
        self.exact_tail = exact_keys.shape[-2] if self.window else 0
        return exact_keys, exact_values, new_keys, new_values

    # How latents are stored; QuantizedSVDCacheLayer stores integer codes instead.
    def _encode(self, projection, states: torch.Tensor) -> torch.Tensor:
        # Latents are rounded to the storage dtype before use, so a token reads the same whether its latent
        # was computed in this call or stored by an earlier one.
        return projection.encode(states).to(self.dtype)

    def _kept(self, name: str, new: torch.Tensor, count: int) -> torch.Tensor:
        """The stored latents `name` ("keys" or "values") followed by the first `count` tokens of `new`."""
        kept, self._buffers[name] = append_along(self._buffers.get(name), getattr(self, name), new[..., :count, :])
        return kept

    def _all_latents(self, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """`stored` followed by all of `new`, as floating-point latents ready to decode."""
        return torch.cat([stored, new], dim=-2)

    def key_positions(self) -> torch.Tensor:
        """Positions of the columns `update` returned: every token, then the exact tail again."""
        return torch.cat([self.positions, self.positions[:, self.positions.shape[1] - self.exact_tail :]], dim=-1)

    def get_seq_length(self) -> int:
        return self.positions.shape[-1] if self.is_initialized else 0

    # Sequence and batch operations: one function mapped over every stored tensor. The latents go through the three
    # hooks below, which QuantizedSVDCacheLayer overrides for its integer codes.
    def _map_latents(self, fn, latents: torch.Tensor) -> torch.Tensor:
        return fn(latents)

    def _crop_latents(self, latents: torch.Tensor, length: int) -> torch.Tensor:
        return latents[..., :length, :]

    def _latent_nbytes(self, name: str) -> int:
        return held_nbytes(getattr(self, name), self._buffers.get(name))

    def _map_batch(self, fn) -> None:
        self.keys, self.values = self._map_latents(fn, self.keys), self._map_latents(fn, self.values)
        for name in ("recent_keys", "recent_values", "positions"):
            setattr(self, name, fn(getattr(self, name)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        # The newest tokens go first from the window, then from the latents.
        remove = min(-tokens_to_remove, self.get_seq_length())
        from_recent = min(remove, self.recent_keys.shape[-2])
        keep_recent = self.recent_keys.shape[-2] - from_recent
        self.recent_keys, self.recent_values = self.recent_keys[..., :keep_recent, :], self.recent_values[..., :keep_recent, :]
        keep_latent = self.keys.shape[-2] - (remove - from_recent)
        self.keys, self.values = self._crop_latents(self.keys, keep_latent), self._crop_latents(self.values, keep_latent)
        self.positions = self.positions[..., : self.positions.shape[-1] - remove]
        self._buffers = {}  # the next token must not overwrite, in place, tokens an older view still shows

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
        super().reset()
        self.positions = self.recent_keys = self.recent_values = None
        self.exact_tail = 0
        self._buffers = {}

    def nbytes(self) -> int:
        """Bytes held: key and value latents (integer codes with their scales and zero points when quantized), the
        full-precision window and positions, with the spare room their buffers keep for the next tokens."""
        if not self.is_initialized:
            return 0
        exact = sum(t.numel() * t.element_size() for t in (self.recent_keys, self.recent_values))
        positions = held_nbytes(self.positions, self._buffers.get("positions"))
        return self._latent_nbytes("keys") + self._latent_nbytes("values") + exact + positions


class SVDCompressedCache(Cache):
    """A KV cache storing pre-RoPE key latents (with their positions) and value latents for every layer.

    Build it from a model patched with `patch_model` (it takes the model's bases), or from `bases` directly.
    Only a patched model can fill it: its attention hands over keys before RoPE, which stock attention cannot.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        bases: SVDBases | None = None,
        window: int | None = None,
        latent_bits: int | None = None,
        exact_prefill: bool | None = None,
    ):
        from .patch import patch_state

        state = patch_state(model) if model is not None else None
        if bases is None:
            if state is None:
                raise ValueError(
                    "SVDCompressedCache needs a model patched with hf_svdkv.patch_model (or explicit bases=): "
                    "an unpatched model stores keys after RoPE, which this cache cannot compress"
                )
            bases = state.bases
        if window is None:
            window = state.window if state is not None else 0
        if latent_bits is None and state is not None:
            latent_bits = state.latent_bits
        if exact_prefill is None:
            exact_prefill = state.exact_prefill if state is not None else True
        check_window(window)
        check_latent_bits(latent_bits)
        self.bases = bases
        self.window = window
        self.latent_bits = latent_bits
        # A prompt (a forward into the empty cache) attends over its exact keys and values; see CompressionConfig.
        self.exact_prefill = exact_prefill
        self.checked_against: set[int] = set()
        head_dim = bases.geometry.head_dim
        super().__init__(layers=[self._make_layer(layer, head_dim) for layer in bases.layers])

    def _make_layer(self, bases: LayerBases, head_dim: int) -> SVDCacheLayer:
        if self.latent_bits is None:
            return SVDCacheLayer(bases, head_dim, self.window)
        from .quantized_layer import QuantizedSVDCacheLayer

        return QuantizedSVDCacheLayer(bases, head_dim, self.window, bits=self.latent_bits)

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
        """Bytes held by every tensor of the cache (latents and positions)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes held per cached token and batch row (0 when empty)."""
        first = self.layers[0]
        tokens = first.get_seq_length() * (first.positions.shape[0] if first.is_initialized else 0)
        return self.nbytes() / tokens if tokens else 0.0


# The seed API's names for this module (`core.cache`), defined in hf_svdkv.seed and imported on first use.
_SEED_NAMES = {"LLaMAKVCache": ".seed.kv_store", "StandardKVCache": ".seed.kv_store"}


def __getattr__(name: str) -> object:
    if name in _SEED_NAMES:
        import importlib

        return getattr(importlib.import_module(_SEED_NAMES[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
