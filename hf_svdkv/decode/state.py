"""What attention over a layer's latents needs besides the latents, built once per cache layer: the key up projection
laid out for rebuilding keys, and the value up projection, alone or folded into `o_proj`.

Values are never rebuilt per token: a query head attends over its group's value latents, and only its output (one
latent row per query head and token) is projected up. Folded into `o_proj` once, the up projection costs nothing of
its own, but the folded weight is hidden x rank per query head against o_proj's hidden x head_dim: it pays only
while value latents are narrower than a head (`folding_pays`). Joint bases, whose rank spans several KV heads, keep
the two apart (on the default model the folded weights would take 59 MB, 3x o_proj's, and 2x its multiply-adds).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..projection import Projection
from ..svd_cache import SVDCacheLayer
from .rope import interleave


def _per_kv_head(projection: Projection, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Each KV head's slice of its group's up projection [kv_heads, rank, head_dim]."""
    groups, rank, _ = projection.up.shape
    return (
        projection.up.reshape(groups, rank, num_kv_heads // groups, head_dim)
        .transpose(1, 2)
        .reshape(num_kv_heads, rank, head_dim)
    )


def _per_query_head(
    projection: Projection, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's slice of its KV head's up projection [heads, rank, head_dim] and center [heads, head_dim]."""
    up = _per_kv_head(projection, num_kv_heads, head_dim)
    center = projection.center.reshape(num_kv_heads, head_dim)
    repeats = num_heads // num_kv_heads
    return up.repeat_interleave(repeats, dim=0), center.repeat_interleave(repeats, dim=0)


def folding_pays(hidden: int, head_dim: int, value_rank: int) -> bool:
    """Whether o_proj folded onto value latents (hidden x rank per query head) takes fewer multiply-adds and bytes
    than projecting each head's output up (rank x head_dim) and then through o_proj (hidden x head_dim)."""
    return hidden * value_rank < value_rank * head_dim + hidden * head_dim


def fold_value_up_into_o_proj(
    o_proj_weight: torch.Tensor, value_projection: Projection, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`o_proj` acting on value latents: (weight [hidden, num_heads * value_rank], bias [hidden]).

    Query head j reads KV head h's values v = c @ U_h + m_h, so W_o,j v_j = (W_o,j U_hᵀ) c + W_o,j m_h; summed over
    heads, the first term is the folded weight and the second, since softmax weights sum to 1, a constant bias.
    Computed in float64 (the product of two roundings is then rounded once), returned in float32."""
    hidden = o_proj_weight.shape[0]
    up, center = (t.double() for t in _per_query_head(value_projection, num_heads, num_kv_heads, head_dim))
    weight = o_proj_weight.double().reshape(hidden, num_heads, head_dim)
    folded = torch.einsum("ojd,jrd->ojr", weight, up).reshape(hidden, -1)
    bias = torch.einsum("ojd,jd->o", weight, center)
    return folded.float(), bias.float()


@dataclass
class LayerState:
    """Per cache layer, built once: bases laid out for rebuilding keys and the folded output projection."""

    projection: object  # the layer's LayerBases this was built from (identity-checked)
    o_proj_weight: torch.Tensor  # the o_proj weight this was built from (identity-checked)
    # Keys of a group = latents @ key_weight[g].T + key_bias[g]: [key_groups, heads per group * d, rank] in the
    # latents' dtype and [key_groups, heads per group * d] float32, each head interleaved; no bias when the center is 0.
    key_weight: torch.Tensor
    key_bias: torch.Tensor | None
    key_rows: torch.Tensor  # [key_groups, rank, width] float32, heads interleaved (the CPU kernel's layout)
    value_center: torch.Tensor  # [kv_heads, head_dim] float32: subtracted from exact values (added back after)
    # Folded (`folding_pays`): o_proj on value latents [hidden, heads * value_rank] in the model dtype and its bias
    # [hidden]. Not folded: value_up [kv_heads, value_rank, head_dim] float32, and o_proj serves as it is.
    out_weight: torch.Tensor | None
    out_bias: torch.Tensor | None
    value_up: torch.Tensor | None
    kernel_data: dict[str, Any] = field(default_factory=dict)  # layouts a decode backend derives once (AMX tiles)

    @property
    def num_kv_heads(self) -> int:
        return self.value_center.shape[0]


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_state(module: nn.Module, layer: SVDCacheLayer) -> LayerState:
    """The state of `layer` read by attention `module`, rebuilt only when its bases or o_proj weight change."""
    state = _STATES.get(layer)
    weight = module.o_proj.weight
    if state is not None and state.projection is layer.projection and state.o_proj_weight is weight:
        return state
    key, value = layer.projection.key, layer.projection.value
    head_dim = layer.head_dim
    groups, rank, width = key.up.shape
    key_rows = interleave(key.up.reshape(groups, rank, -1, head_dim)).reshape(groups, rank, width)
    key_bias = interleave(key.center.reshape(groups, -1, head_dim)).reshape(groups, width)
    num_heads = module.config.num_attention_heads
    num_kv_heads = value.num_groups * (value.up.shape[-1] // head_dim)
    out_weight = out_bias = value_up = None
    if folding_pays(weight.shape[0], head_dim, value.rank):
        out_weight, out_bias = fold_value_up_into_o_proj(weight, value, num_heads, num_kv_heads, head_dim)
        if module.o_proj.bias is not None:
            out_bias = out_bias + module.o_proj.bias.float()
        out_weight, out_bias = out_weight.to(weight.dtype), out_bias.to(weight.dtype)
    else:
        value_up = _per_kv_head(value, num_kv_heads, head_dim).float().contiguous()
    state = LayerState(
        projection=layer.projection,
        o_proj_weight=weight,
        key_weight=key_rows.mT.to(layer.dtype).contiguous(),
        key_bias=key_bias.float() if key_bias.any() else None,
        key_rows=key_rows.float().contiguous(),
        value_center=value.center.reshape(num_kv_heads, head_dim).float(),
        out_weight=out_weight,
        out_bias=out_bias,
        value_up=value_up,
    )
    _STATES[layer] = state
    return state


@dataclass
class LatentAttentionOutput:
    """Attention output of every query head, before `o_proj`, in two parts whose softmax weights are already applied:
    `latent` [batch, q, heads, value_rank] over value latents (project with the folded weight and bias) and
    `exact` [batch, q, heads, head_dim] over exact values (window, sinks) minus their center (project with o_proj's
    weight)."""

    latent: torch.Tensor
    exact: torch.Tensor | None = None


def project_output(module: nn.Module, state: LayerState, out: LatentAttentionOutput) -> torch.Tensor:
    """The attention module's output [batch, q, hidden]. Folded: o_proj on value latents for the latent part, o_proj's
    own weight on the exact part. Not folded: each head's output projected up, its center and exact part added (the
    softmax weights of both parts sum to 1), then o_proj."""
    dtype = module.o_proj.weight.dtype
    if state.out_weight is not None:
        result = F.linear(out.latent.flatten(-2).to(dtype), state.out_weight, state.out_bias)
        if out.exact is not None:
            result = result + F.linear(out.exact.flatten(-2).to(dtype), module.o_proj.weight)
        return result
    batch, query_len, num_heads, rank = out.latent.shape
    num_kv_heads, _, head_dim = state.value_up.shape
    latent = out.latent.float().reshape(batch, query_len, num_kv_heads, num_heads // num_kv_heads, rank)
    heads = torch.einsum("bqkpr,krd->bqkpd", latent, state.value_up) + state.value_center[:, None]
    heads = heads.reshape(batch, query_len, num_heads, head_dim)
    if out.exact is not None:
        heads = heads + out.exact
    return module.o_proj(heads.flatten(-2).to(dtype))
