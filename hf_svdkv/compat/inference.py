"""`LLaMACompressionInference`: the seed's benchmark: every profile against the full cache, measured for real.

Perplexity and KV bytes come from `hf_svdkv.eval.run_eval` (continuation protocol: prefill a context into a fresh
cache, teacher-force the continuation through it); bytes are counted from the caches' actual tensors.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..patch import is_patched, patch_model, unpatch_model
from ..svd_cache import SVDCompressedCache
from ..tools.eval import RowSpec, dynamic_row, run_eval
from .dataset import LLaMADatasetProcessor
from .model_loader import LLaMAModelLoader
from .profile_builder import LLaMACompressionProfileBuilder


class LLaMACompressionInference:
    """Benchmarks a builder's profiles on its loader's model.

    Args:
        model_loader: the model (default: `LLaMAModelLoader()` from the environment).
        profile_builder: the profiles (default: the core's `med` profile).
        dataset_processor: the text (default: a processor on the same loader).
    """

    def __init__(
        self,
        model_loader: LLaMAModelLoader | None = None,
        profile_builder: LLaMACompressionProfileBuilder | None = None,
        dataset_processor: LLaMADatasetProcessor | None = None,
    ):
        self.model_loader = model_loader or getattr(profile_builder, "model_loader", None) or LLaMAModelLoader()
        self.profile_builder = profile_builder or LLaMACompressionProfileBuilder(self.model_loader)
        self.dataset_processor = dataset_processor or LLaMADatasetProcessor(self.model_loader)

    def _profile_row(self, name: str) -> RowSpec:
        bases = self.profile_builder.bases(name)
        patched_here: list[bool] = []

        def setup(model: nn.Module):
            if not is_patched(model):  # a patched model fills any SVDCompressedCache: it carries its bases
                patch_model(model, bases=bases)
                patched_here.append(True)
            # The seed's benchmark scores the compression itself: prompts are read back from their latents too.
            return lambda: SVDCompressedCache(bases=bases, exact_prefill=False)

        def teardown(model: nn.Module) -> None:
            if patched_here:
                unpatch_model(model)
                patched_here.clear()

        return RowSpec(name, setup=setup, teardown=teardown)

    def run_compression_benchmark(
        self,
        profiles: list[str] | None = None,
        num_samples: int = 2,
        context: int = 96,
        continuation: int = 32,
        dataset: str = "wiki",
    ) -> dict[str, Any]:
        """Perplexity and KV bytes per token of every profile (default: all of the builder's) and of the full
        `DynamicCache`, on `num_samples` windows of `context + continuation` tokens of `dataset`.

        Returns ``profiles`` (per profile: ranks, ppl, ppl_increase_pct, kv_bytes_per_token, compression_ratio,
        memory_savings, seconds), ``baseline``, ``aggregate_metrics`` (averages over the profiles:
        avg_memory_savings, avg_compression_ratio, avg_ppl_increase_pct; baseline_ppl, counts) and ``settings``."""
        names = profiles or self.profile_builder.get_available_profiles()
        ranks = self.profile_builder.profile_ranks()
        unknown = [n for n in names if n not in ranks]
        if unknown:
            raise ValueError(f"unknown profiles {unknown}: choose from {', '.join(ranks)}")
        documents = self.dataset_processor.load_dataset(dataset)
        batch = self.dataset_processor.preprocess_for_compression(documents, context + continuation, num_samples)
        rows = [dynamic_row(), *(self._profile_row(name) for name in names)]
        result = run_eval(
            self.model_loader.model,
            batch["input_ids"].reshape(-1),
            rows,
            protocol="continuation",
            context=context,
            continuation=continuation,
            n_windows=batch["num_samples"],
            model_name=self.model_loader.name,
            dataset_name=batch["source"] or dataset,
            progress=False,
        )
        baseline, measured = result.rows[0], result.rows[1:]
        per_profile = {
            row.name: {
                "key_rank": ranks[row.name][0],
                "value_rank": ranks[row.name][1],
                "ppl": row.ppl,
                "ppl_increase_pct": row.delta_pct,
                "kv_bytes_per_token": row.kv_bytes_per_token,
                "compression_ratio": row.compression_ratio,
                "memory_savings": 1 - row.kv_bytes_per_token / baseline.kv_bytes_per_token,
                "seconds": row.seconds,
            }
            for row in measured
        }

        def mean(key: str) -> float:
            return sum(p[key] for p in per_profile.values()) / len(per_profile)

        return {
            "model": result.model,
            "dataset": result.dataset,
            "protocol": result.protocol,
            "baseline": {
                "ppl": baseline.ppl,
                "kv_bytes_per_token": baseline.kv_bytes_per_token,
                "seconds": baseline.seconds,
            },
            "profiles": per_profile,
            "aggregate_metrics": {
                "avg_memory_savings": mean("memory_savings"),
                "avg_compression_ratio": mean("compression_ratio"),
                "avg_ppl_increase_pct": mean("ppl_increase_pct"),
                "baseline_ppl": baseline.ppl,
                "num_profiles": len(per_profile),
                "num_samples": result.settings["windows"],
                "tokens_scored": result.settings["windows"] * result.settings["scored_tokens_per_window"],
            },
            "settings": result.settings,
        }
