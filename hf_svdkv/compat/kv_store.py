"""The seed's explicit KV stores: `store_kv` appends a head's keys/values token by token, `get_kv` reads them back.

These are for code that manages its own keys and values (experiments, kernels, the seed's examples). A model's
`generate()` uses `hf_svdkv.SVDCompressedCache` (a transformers `Cache`) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _Chunk:
    keys: torch.Tensor  # [tokens, key_dim]
    values: torch.Tensor  # [tokens, value_dim]
    metadata: dict[str, Any] = field(default_factory=dict)


def _as_tokens(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise ValueError(
            f"{name} must be a tensor [dim] (one token) or [tokens, dim], got {getattr(tensor, 'shape', tensor)!r}"
        )
    return tensor.detach().reshape(-1, tensor.shape[-1])


class StandardKVCache:
    """Uncompressed keys and values per (layer, head) stream: the baseline the compressed store is measured against."""

    def __init__(self) -> None:
        self._streams: dict[tuple[int, int], list[_Chunk]] = {}

    def store_kv(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        metadata: dict[str, Any] | None = None,
        *,
        layer_idx: int = 0,
        head_idx: int = 0,
    ) -> range:
        """Append keys/values ([dim] or [tokens, dim]) to one stream; returns the token indices they got."""
        keys, values = _as_tokens("keys", keys), _as_tokens("values", values)
        if keys.shape[0] != values.shape[0]:
            raise ValueError(f"keys hold {keys.shape[0]} tokens but values {values.shape[0]}")
        chunk = _Chunk(keys, values, dict(metadata or {}))
        self._check(chunk)
        stream = self._streams.setdefault((layer_idx, head_idx), [])
        start = self.num_tokens(layer_idx, head_idx)
        stream.append(chunk)
        return range(start, start + keys.shape[0])

    def get_kv(
        self, token_idx: int | None = None, *, layer_idx: int = 0, head_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one token ([dim] each), or of the whole stream ([tokens, dim]) when `token_idx` is None."""
        stream = self._streams.get((layer_idx, head_idx))
        if not stream:
            raise KeyError(f"nothing stored for layer {layer_idx}, head {head_idx}")
        if token_idx is None:
            parts = [self._read(chunk) for chunk in stream]
            return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])
        total = self.num_tokens(layer_idx, head_idx)
        if isinstance(token_idx, bool) or not isinstance(token_idx, int) or not -total <= token_idx < total:
            raise IndexError(
                f"token_idx {token_idx!r} out of range: layer {layer_idx}, head {head_idx} holds {total} tokens"
            )
        token_idx %= total
        for chunk in stream:
            if token_idx < chunk.keys.shape[0]:
                keys, values = self._read(chunk, token_idx)
                return keys[0], values[0]
            token_idx -= chunk.keys.shape[0]
        raise AssertionError("unreachable")

    def metadata(self, token_idx: int, *, layer_idx: int = 0, head_idx: int = 0) -> dict[str, Any]:
        """The metadata stored with the token's `store_kv` call."""
        for chunk in self._streams.get((layer_idx, head_idx), []):
            if token_idx < chunk.keys.shape[0]:
                return chunk.metadata
            token_idx -= chunk.keys.shape[0]
        raise IndexError(f"token_idx out of range for layer {layer_idx}, head {head_idx}")

    def num_tokens(self, layer_idx: int = 0, head_idx: int = 0) -> int:
        return sum(chunk.keys.shape[0] for chunk in self._streams.get((layer_idx, head_idx), []))

    def streams(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs holding tokens."""
        return sorted(self._streams)

    def nbytes(self) -> int:
        """Bytes of everything stored (keys and values as stored)."""
        return sum(t.numel() * t.element_size() for chunk in self._chunks() for t in (chunk.keys, chunk.values))

    def memory_usage(self) -> dict[str, float]:
        tokens = sum(chunk.keys.shape[0] for chunk in self._chunks())
        return {"bytes": self.nbytes(), "mb": self.nbytes() / 2**20, "tokens": tokens, "streams": len(self._streams)}

    def clear(self) -> None:
        self._streams.clear()

    def __len__(self) -> int:
        return sum(chunk.keys.shape[0] for chunk in self._chunks())

    # --- what subclasses change ---------------------------------------------------------------------------------------
    def _chunks(self) -> list[_Chunk]:
        return [chunk for stream in self._streams.values() for chunk in stream]

    def _check(self, chunk: _Chunk) -> None:
        pass

    def _read(self, chunk: _Chunk, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(None) if index is None else slice(index, index + 1)
        return chunk.keys[rows], chunk.values[rows]


class LLaMAKVCache(StandardKVCache):
    """Compressed keys/values (latents) per stream, rebuilt to full size by `get_kv`.

    How a chunk is rebuilt comes from its metadata: ``{"profile": name}`` (with the `profile_builder` this store
    was made with; keys must be pre-RoPE latents from ``builder.compress_keys``), or explicit
    ``key_reconstruction`` [key_rank, head_dim] / ``value_reconstruction`` [value_rank, head_dim] matrices (plus
    optional ``key_center`` / ``value_center``). A chunk with neither is returned as stored. Other metadata (such
    as ``compression_ratio``) is kept and reported by `compression_stats`.
    """

    def __init__(self, profile_builder: Any = None) -> None:
        super().__init__()
        self.profile_builder = profile_builder

    def _check(self, chunk: _Chunk) -> None:
        profile = chunk.metadata.get("profile")
        if profile is not None and self.profile_builder is None:
            raise ValueError(
                f"metadata names profile {profile!r} but this LLaMAKVCache has no profile_builder to rebuild with"
            )
        for kind, latents in (("key", chunk.keys), ("value", chunk.values)):
            up = chunk.metadata.get(f"{kind}_reconstruction")
            if up is not None and up.shape[0] != latents.shape[-1]:
                raise ValueError(
                    f"{kind}_reconstruction has {up.shape[0]} rows but the {kind} latents have {latents.shape[-1]} dims"
                )

    def _read(self, chunk: _Chunk, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super()._read(chunk, index)
        meta = chunk.metadata
        if meta.get("profile") is not None:
            where = {"head_idx": meta.get("head_idx", 0), "layer_idx": meta.get("layer_idx")}
            builder = self.profile_builder
            return (
                builder.reconstruct_keys(keys, profile=meta["profile"], **where),
                builder.reconstruct_values(values, meta["profile"], **where),
            )
        return self._rebuild(keys, meta, "key"), self._rebuild(values, meta, "value")

    @staticmethod
    def _rebuild(latents: torch.Tensor, meta: dict[str, Any], kind: str) -> torch.Tensor:
        up = meta.get(f"{kind}_reconstruction")
        if up is None:
            return latents
        full = latents.to(up.dtype) @ up.to(latents.device)
        center = meta.get(f"{kind}_center")
        return (full + center.to(full.device) if center is not None else full).to(latents.dtype)

    def compression_stats(self) -> dict[str, float]:
        """Bytes stored vs bytes of the rebuilt keys/values (in the stored dtype), and the mean reported ratio."""
        stored = self.nbytes()
        full = 0
        for chunk in self._chunks():
            keys, values = self._read(chunk)
            full += sum(t.numel() * chunk.keys.element_size() for t in (keys, values))
        reported = [c.metadata["compression_ratio"] for c in self._chunks() if "compression_ratio" in c.metadata]
        return {
            "stored_bytes": stored,
            "full_bytes": full,
            "compression_ratio": full / stored if stored else 0.0,
            "memory_savings": 1 - stored / full if full else 0.0,
            "reported_compression_ratio": sum(reported) / len(reported) if reported else float("nan"),
        }
