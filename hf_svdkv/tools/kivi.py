"""transformers' QuantizedCache with KIVI's axes on prompts of any length.

KIVI quantizes keys per channel over groups of G tokens and values per token, and keeps the tokens that do not yet
fill a group (and the most recent ones) in full precision. transformers' quanto layer quantizes the whole prompt at
once, so a prompt whose length is not a multiple of G raises ("Group size (64) must be a divisor of (6108)"); with
heads and tokens flattened, a group would also straddle two heads. This layer quantizes the longest whole-group prefix
and keeps the remainder in the residual, which is what KIVI itself does; the residual is counted in the cache's bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig, QuantizedCache
from transformers.cache_utils import QuantoQuantizedLayer


class KiviQuantoLayer(QuantoQuantizedLayer):
    """QuantoQuantizedLayer whose quantized part always holds a whole number of `q_group_size`-token groups."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._quantized_keys = self._quantized_values = None
            keys, values = key_states, value_states
        else:
            keys = torch.cat([*self._dequantized(self._quantized_keys), self.keys, key_states], dim=-2)
            values = torch.cat([*self._dequantized(self._quantized_values), self.values, value_states], dim=-2)
        residual = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        if self._quantized_keys is None or residual + key_states.shape[-2] >= self.residual_length:
            whole = keys.shape[-2] // self.q_group_size * self.q_group_size
            if whole:
                self._quantized_keys = self._quantize(keys[..., :whole, :].contiguous(), axis=self.axis_key)
                self._quantized_values = self._quantize(values[..., :whole, :].contiguous(), axis=self.axis_value)
            self.keys = keys[..., whole:, :].clone()
            self.values = values[..., whole:, :].clone()
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return keys, values

    def _dequantized(self, quantized: Any) -> list[torch.Tensor]:
        return [] if quantized is None else [self._dequantize(quantized)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by the KIVI-axes peer cache")


def kivi_cache(config: PreTrainedConfig, nbits: int, **kwargs: Any) -> QuantizedCache:
    """A quanto QuantizedCache (keys per channel, values per token: `axis_key=-1, axis_value=0`) for any length."""
    cache = QuantizedCache(backend="quanto", config=config, nbits=nbits, **kwargs)
    cache.layers = [KiviQuantoLayer(nbits=nbits, **kwargs) for _ in cache.layers]
    return cache
