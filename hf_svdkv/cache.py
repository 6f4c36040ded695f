"""`SVDCompressedCache`: a transformers `Cache` whose layers hold low-rank latents instead of full keys/values."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .bases import SVDBases
from .projection import LayerBases


class SVDCacheLayer(DynamicLayer):
    """One layer's latents. `keys` [batch, groups, seq, key_rank] are latents of the keys *before* RoPE, so
    `positions` [batch, seq] keeps the position each token was written at (rows differ under left padding).
    `values` [batch, groups, seq, value_rank]. Everything `DynamicLayer` does along batch and sequence
    (crop, beam reorder, batch selection) applies to latents unchanged; positions follow along."""

    is_compileable = False

    def __init__(self, bases: LayerBases, head_dim: int):
        super().__init__()
        self.bases = bases
        self.head_dim = head_dim
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Projections run in float32 (or the bases' own wider dtype) whatever the model dtype: the latents are
        # rounded once, when stored, like a 16-bit DynamicCache rounds its keys once.
        compute_dtype = torch.promote_types(self.bases.key.down.dtype, torch.float32)
        self.projection = self.bases.to(self.device, compute_dtype)
        batch = key_states.shape[0]
        self.keys = key_states.new_zeros((batch, self.projection.key.num_groups, 0, self.projection.key.rank))
        self.values = value_states.new_zeros((batch, self.projection.value.num_groups, 0, self.projection.value.rank))
        self.positions = torch.zeros((batch, 0), dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store latents of the new pre-RoPE keys and values; return all keys (pre-RoPE) and values rebuilt."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_keys = self.projection.key.encode(key_states).to(self.dtype)
        new_values = self.projection.value.encode(value_states).to(self.dtype)
        self.keys = torch.cat([self.keys, new_keys], dim=-2)
        self.values = torch.cat([self.values, new_values], dim=-2)
        self.positions = torch.cat([self.positions, positions.to(self.device, torch.int32)], dim=-1)
        return self.rebuild_keys(), self.rebuild_values()

    def rebuild_keys(self) -> torch.Tensor:
        """Pre-RoPE keys [batch, kv_heads, seq, head_dim] in the model dtype."""
        return self.projection.key.decode(self.keys, self.head_dim).to(self.dtype)

    def rebuild_values(self) -> torch.Tensor:
        return self.projection.value.decode(self.values, self.head_dim).to(self.dtype)

    # Sequence and batch operations: DynamicLayer handles keys/values, positions follow the same indices.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.is_initialized:
            self.positions = self.positions[..., :tokens_to_remove]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.get_seq_length() > 0:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.get_seq_length() > 0:
            self.positions = self.positions[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.get_seq_length() > 0:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def offload(self) -> None:
        super().offload()
        if self.is_initialized:
            self.positions = self.positions.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized and self.positions.device != self.device:
            self.positions = self.positions.to(self.device, non_blocking=True)

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def nbytes(self) -> int:
        """Bytes held: key and value latents plus positions."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


class SVDCompressedCache(Cache):
    """A KV cache storing pre-RoPE key latents (with their positions) and value latents for every layer.

    Build it from a model patched with `patch_model` (it takes the model's bases), or from `bases` directly.
    Only a patched model can fill it: its attention hands over keys before RoPE, which stock attention cannot.
    """

    def __init__(self, model: torch.nn.Module | None = None, *, bases: SVDBases | None = None):
        if bases is None:
            from .patch import patch_state

            state = patch_state(model) if model is not None else None
            if state is None:
                raise ValueError(
                    "SVDCompressedCache needs a model patched with hf_svdkv.patch_model (or explicit bases=): "
                    "an unpatched model stores keys after RoPE, which this cache cannot compress"
                )
            bases = state.bases
        self.bases = bases
        self.checked_against: set[int] = set()
        head_dim = bases.geometry.head_dim
        super().__init__(layers=[SVDCacheLayer(layer, head_dim) for layer in bases.layers])

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
        tokens = first.get_seq_length() * (first.keys.shape[0] if first.is_initialized else 0)
        return self.nbytes() / tokens if tokens else 0.0
