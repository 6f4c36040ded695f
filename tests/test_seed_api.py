"""The seed project's API (`core.*`) on this library: its documented examples run on the default model with only the
import prefix changed (``core.`` -> ``hf_svdkv.``), and what they print is measured, not made up."""

from __future__ import annotations

import re
import warnings
from abc import ABC

import pytest
import torch
from tiny_models import structured_ids, tiny_model

import hf_svdkv
from hf_svdkv import (
    CompressedAutoregressiveDecoder,
    InferenceConfig,
    LegacyCompressionWrapper,
    LLaMACompressionProfileBuilder,
    LLaMADatasetProcessor,
    LLaMAFullForward,
    LLaMAKVCache,
    LLaMAModelLoader,
    MemoryManager,
    ModelConfig,
    ModelLoaderInterface,
    StandardKVCache,
    SVDBases,
    SVDCompressedCache,
    SVDCompressionAlgorithm,
    patch_model,
)
from hf_svdkv.compat.svd import WeightBasis
from hf_svdkv.config import CompressionConfig  # the seed's: its spelling of ranks, weight-only by default

pytest_plugins = ["fixtures_real"]

# The seed's examples as documented (core_modules.md, "Common Usage Patterns"; blank lines without trailing spaces).
COMPLETE_WORKFLOW_EXAMPLE = """
from core.config import ModelConfig, CompressionConfig
from core.model import LLaMAModelLoader
from core.compression import LLaMACompressionProfileBuilder
from core.inference import LLaMACompressionInference
from core.utils import MemoryManager

# Configuration
model_config = ModelConfig.from_env()
compression_config = CompressionConfig(
    value_compression_ranks={"med": 64},
    key_compression_rank=32
)

# Memory management
memory_manager = MemoryManager()

with memory_manager.managed_computation():
    # Model loading
    model_loader = LLaMAModelLoader(model_config)
    model_loader.load_model()

    # Compression setup
    profile_builder = LLaMACompressionProfileBuilder(
        model_loader, compression_config
    )
    profile_builder.build_compression_profiles(layer_idx=0)

    # Inference
    inference = LLaMACompressionInference(model_loader, profile_builder)
    results = inference.run_compression_benchmark()

    print(f"Compression successful: {results['aggregate_metrics']}")
"""

CUSTOM_IMPLEMENTATION_EXAMPLE = """
from core.interfaces import CompressionInterface
from core.compression import SVDCompressionAlgorithm

class CustomCompressionAlgorithm(CompressionInterface):
    def __init__(self):
        self.svd_algorithm = SVDCompressionAlgorithm()

    def compress_values(self, values: torch.Tensor, profile: str) -> torch.Tensor:
        # Custom preprocessing
        preprocessed = self.custom_preprocessing(values)

        # Use built-in SVD
        compressed = self.svd_algorithm.compress_matrix(
            preprocessed, rank=self.get_rank_for_profile(profile)
        )

        return compressed
"""


def run_seed_example(source: str, namespace: dict | None = None) -> dict:
    """Execute a seed example with its import prefix changed, and nothing else."""
    code = source.replace("from core.", "from hf_svdkv.")
    assert code.count("hf_svdkv.") == source.count("core.")
    namespace = {} if namespace is None else namespace
    exec(compile(code, "<seed example>", "exec"), namespace)
    return namespace


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loader(default_model) -> LLaMAModelLoader:
    model, tokenizer = default_model
    return LLaMAModelLoader(ModelConfig(dtype="float32"), model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def first_layer_values(loader) -> torch.Tensor:
    """Real values of layer 0 on real text: [tokens, kv_heads, head_dim]."""
    captured = []
    v_proj = loader.model.model.layers[0].self_attn.v_proj
    handle = v_proj.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    ids = loader.tokenizer(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built it. " * 2,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        loader.model(ids)
    handle.remove()
    return captured[0][0].reshape(ids.shape[1], loader.num_key_value_heads, loader.head_dim)


# --- the seed's examples ----------------------------------------------------------------------------------------------
def test_complete_workflow_example(monkeypatch, capsys):
    for name in ("MODEL", "DEVICE", "DTYPE", "ATTN"):
        monkeypatch.delenv(f"HF_SVDKV_{name}", raising=False)
    namespace = run_seed_example(COMPLETE_WORKFLOW_EXAMPLE)
    printed = capsys.readouterr().out
    results, loader = namespace["results"], namespace["model_loader"]
    metrics = results["aggregate_metrics"]

    # Measured bytes: bf16 latents of 32 + 64 dims per KV head plus one int32 position per token and layer, against
    # bf16 keys and values of 64 + 64 dims: SmolLM2 has 30 layers and 3 KV heads.
    assert loader.model.dtype == torch.bfloat16
    full = 30 * 3 * (64 + 64) * 2
    compressed = 30 * 3 * (32 + 64) * 2 + 30 * 4
    assert results["baseline"]["kv_bytes_per_token"] == full
    assert results["profiles"]["med"]["kv_bytes_per_token"] == compressed
    assert metrics["avg_memory_savings"] == pytest.approx(1 - compressed / full)
    assert metrics["avg_compression_ratio"] == pytest.approx(full / compressed)
    # Keys at half rank with weight-only bases cost quality (values are kept at full rank: 64 = head_dim).
    assert 5 < metrics["baseline_ppl"] < 100
    assert metrics["avg_ppl_increase_pct"] > 1
    assert metrics["num_profiles"] == 1 and metrics["num_samples"] == 2 and metrics["tokens_scored"] == 64

    line = re.fullmatch(r"Compression successful: (\{.*\})\n", printed)
    assert line is not None, printed
    assert f"'avg_memory_savings': {metrics['avg_memory_savings']}" in line.group(1)
    assert f"'baseline_ppl': {metrics['baseline_ppl']}" in line.group(1)

    record = namespace["memory_manager"].history[-1]
    assert record["seconds"] > 0 and record["rss_after_bytes"] > 0 and "cleanup" in record


def test_custom_implementation_example(first_layer_values, capsys):
    namespace = run_seed_example(CUSTOM_IMPLEMENTATION_EXAMPLE, {"torch": torch})
    algorithm = namespace["CustomCompressionAlgorithm"]()
    values = first_layer_values[:, 0].float()  # KV head 0: [tokens, head_dim]

    for profile, rank in (("low", 32), ("med", 64)):
        compressed = algorithm.compress_values(values, profile)
        error = SVDCompressionAlgorithm.relative_error(values, compressed)
        singular = torch.linalg.svdvals(values.double())
        optimum = (singular[rank:].square().sum() / singular.square().sum()).sqrt().item()
        print(f"profile {profile}: rank {rank}, relative error {error:.4f} (Eckart-Young optimum {optimum:.4f})")
        assert compressed.shape == values.shape
        assert error == pytest.approx(optimum, rel=1e-3, abs=1e-6)
    spectrum = torch.linalg.svdvals(algorithm.compress_values(values, "low").double())
    assert spectrum[31] / spectrum[0] > 1e-3 and spectrum[32] / spectrum[0] < 1e-5  # rank 32, up to float32 rounding
    assert "profile low: rank 32, relative error 0." in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown profile 'ultra': choose one of low, med, high"):
        algorithm.compress_values(values, "ultra")


# --- the seed's classes -----------------------------------------------------------------------------------------------
def test_configs_are_the_core_dataclasses(monkeypatch):
    from hf_svdkv import config, loading

    # The seed's CompressionConfig is the core one with the seed's spelling and defaults (weight-only, no window).
    assert issubclass(config.CompressionConfig, hf_svdkv.CompressionConfig)
    assert (config.CompressionConfig(profile="med").method, hf_svdkv.CompressionConfig(profile="med").method) == (
        "weights",
        "calibrated",
    )
    assert config.ModelConfig is loading.ModelConfig is ModelConfig
    assert config.InferenceConfig is InferenceConfig
    monkeypatch.setenv("HF_SVDKV_DTYPE", "fp16")
    monkeypatch.setenv("HF_SVDKV_DEVICE", "cpu")
    assert ModelConfig.from_env() == ModelConfig(device="cpu", dtype="float16")

    seed = CompressionConfig(
        value_compression_ranks={"low": 8, "med": 16, "high": 24},
        key_compression_rank=12,
        use_memory_efficient_svd=True,
    )
    assert seed.resolve_ranks(head_dim=32, num_kv_heads=2) == (12, 16)  # "med" unless told
    assert CompressionConfig(value_compression_ranks={"tiny": 4}).resolve_ranks(32, 2) == (32, 4)  # seed key rank 32
    assert CompressionConfig(profile="low", value_compression_ranks={"low": 8, "med": 16}).resolve_ranks(32, 2) == (
        32,
        8,
    )
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32)
    seed_bases = SVDBases.from_model(
        model, CompressionConfig(value_compression_ranks={"med": 16}, key_compression_rank=12)
    )
    core_bases = SVDBases.from_model(model, CompressionConfig(key_rank=12, value_rank=16))
    assert seed_bases.key_ranks == core_bases.key_ranks == [12, 12]
    assert seed_bases.value_ranks == core_bases.value_ranks == [16, 16]
    patch_model(model, CompressionConfig(value_compression_ranks={"med": 16}, key_compression_rank=12))
    with torch.no_grad():
        out = model.generate(structured_ids(12), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.layers[0].keys.shape[-1] == 12

    for kwargs, message in [
        (dict(value_compression_ranks={"low": 8, "high": 24}), "several profiles \\(low, high\\) and no 'med'"),
        (dict(value_compression_ranks={}), "non-empty dict"),
        (dict(value_compression_ranks={"med": 0}), "value_compression_ranks\\['med'\\] must be positive"),
        (dict(key_rank=8, value_rank=8, key_compression_rank=16), "key_rank=8 contradicts the seed spelling's rank 16"),
        (
            dict(profile="ultra", value_compression_ranks={"med": 8}),
            "profile 'ultra' is not one of value_compression_ranks",
        ),
        (dict(profile="med", use_memory_efficient_svd="yes"), "use_memory_efficient_svd must be True or False"),
        (dict(key_compression_rank=8), "give both key_rank and value_rank"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompressionConfig(**kwargs)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        InferenceConfig(temperature=-1)
    with pytest.raises(ValueError, match="max_sequence_length must be a positive integer"):
        InferenceConfig(max_sequence_length=0)


def test_model_loader_weights(loader):
    weights = loader.get_attention_weights(layer_idx=0)
    attn = loader.model.model.layers[0].self_attn
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "q_proj": (576, 576),
        "k_proj": (192, 576),
        "v_proj": (192, 576),
        "o_proj": (576, 576),
    }
    assert torch.equal(weights["k_proj"], attn.k_proj.weight)
    assert torch.equal(
        loader.get_attention_weights(-1)["v_proj"], loader.model.model.layers[29].self_attn.v_proj.weight
    )
    assert (loader.num_layers, loader.num_key_value_heads, loader.head_dim, loader.vocab_size) == (30, 3, 64, 49152)
    with pytest.raises(IndexError, match="layer_idx 30 out of range for a model with 30 layers"):
        loader.get_attention_weights(30)
    lazy = LLaMAModelLoader(ModelConfig(dtype="float32"))
    assert not lazy.is_loaded
    assert torch.equal(lazy.get_attention_weights(0)["k_proj"], weights["k_proj"])  # auto-loads
    assert lazy.is_loaded


def test_svd_algorithm_routes(loader):
    v_proj = loader.get_attention_weights(layer_idx=0)["v_proj"]
    algorithm = SVDCompressionAlgorithm()
    singular = torch.linalg.svdvals(v_proj.double())
    for rank, memory_efficient, route in (
        (64, True, "gram"),
        (16, True, "randomized"),
        (64, False, "full"),
        (192, True, "exact"),
    ):
        assert algorithm.method(tuple(v_proj.shape), rank, memory_efficient) == route
        approx = algorithm.compress_matrix(matrix=v_proj, rank=rank, use_memory_efficient=memory_efficient)
        optimum = (singular[rank:].square().sum() / singular.square().sum()).sqrt().item()
        assert approx.shape == v_proj.shape and approx.dtype == v_proj.dtype
        # randomized: within 1% of the optimum; the others exact
        assert algorithm.relative_error(v_proj, approx) == pytest.approx(
            optimum, rel=1e-2 if route == "randomized" else 1e-4, abs=1e-6
        )
    factors = algorithm.factorize(v_proj, 16)
    assert factors.rank == 16 and factors.nbytes() < v_proj.numel() * v_proj.element_size()
    torch.testing.assert_close(factors.left.mT @ factors.left, torch.eye(16), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="got a dict .* pass e.g. weights\\['v_proj'\\]"):
        algorithm.compress_matrix(loader.get_attention_weights(0), rank=8)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        algorithm.compress_matrix(v_proj, rank=0)


def test_profile_builder_and_legacy_wrapper(loader, first_layer_values):
    config = CompressionConfig(value_compression_ranks={"low": 16, "med": 32}, key_compression_rank=24)
    builder = LLaMACompressionProfileBuilder(loader, config)
    profiles = builder.build_compression_profiles(layer_idx=0)
    assert list(profiles) == ["low", "med"] and builder.default_profile == "med"
    assert profiles["low"]["value_compression"].shape == (3, 64, 16)
    assert profiles["med"]["memory_savings"] == pytest.approx(1 - (24 + 32) / 128)
    # The profiles are the core's weight-only bases (the Gram route finds the same subspaces as WeightSVD).
    core = SVDBases.from_model(loader.model, CompressionConfig(key_rank=24, value_rank=32))
    mine = builder.bases("med").layers[0].value
    torch.testing.assert_close(
        mine.down @ mine.up, core.layers[0].value.down @ core.layers[0].value.up, atol=1e-5, rtol=0
    )
    assert isinstance(WeightBasis(builder.algorithm), WeightBasis)

    values = first_layer_values[:, 1]  # KV head 1
    latents = builder.compress_values(values, "med", head_idx=1)
    assert latents.shape == (values.shape[0], 32)
    rebuilt = builder.reconstruct_values(latents, "med", head_idx=1)
    torch.testing.assert_close(builder.compress_values(rebuilt, "med", head_idx=1), latents, atol=1e-4, rtol=1e-4)
    low_error = (
        builder.reconstruct_values(builder.compress_values(values, "low", head_idx=1), "low", head_idx=1) - values
    ).norm()
    assert low_error > (rebuilt - values).norm()  # more rank, less error
    with pytest.raises(IndexError, match="head_idx 3 out of range: the model has 3 KV heads"):
        builder.compress_values(values, "med", head_idx=3)
    with pytest.raises(ValueError, match="unknown profile 'high': choose one of low, med"):
        builder.compress_values(values, "high")
    with pytest.raises(ValueError, match="profile 'big': value rank 128 exceeds this model's head_dim 64"):
        LLaMACompressionProfileBuilder(loader, CompressionConfig(value_compression_ranks={"big": 128})).profile_ranks()

    legacy = LegacyCompressionWrapper(builder, layer_idx=0)
    assert (legacy.head_dim, legacy.num_kv_heads, legacy.key_compression_rank) == (64, 3, 24)
    assert legacy.value_compression_ranks == {"low": 16, "med": 32}
    assert torch.equal(legacy.compress_values(values, "med", head_idx=1), latents)
    assert legacy.get_compression_stats()["low"]["total_compression_ratio"] == pytest.approx(128 / 40)
    old_api = LegacyCompressionWrapper(loader)  # the legacy ranks: values 32 / 48 / 64, keys 32, last layer
    assert old_api.get_available_profiles() == ["low", "med", "high"] and old_api.layer_idx == 29


def test_kv_stores(loader, first_layer_values):
    builder = LLaMACompressionProfileBuilder(
        loader, CompressionConfig(value_compression_ranks={"med": 32}, key_compression_rank=16)
    )
    builder.build_compression_profiles(layer_idx=0)
    values = first_layer_values[:, 0]
    keys = values.flip(0)  # stand-in pre-RoPE keys of the same size
    cache, baseline = LLaMAKVCache(builder), StandardKVCache()
    for token in range(values.shape[0]):
        compressed_keys = builder.compress_keys(keys[token], head_idx=0, profile="med")
        compressed_values = builder.compress_values(values[token], "med", head_idx=0)
        cache.store_kv(
            keys=compressed_keys, values=compressed_values, metadata={"compression_ratio": 128 / 48, "profile": "med"}
        )
        baseline.store_kv(keys[token], values[token])
    retrieved_keys, retrieved_values = cache.get_kv(token_idx=10)
    expected = builder.reconstruct_values(builder.compress_values(values[10], "med"), "med")
    torch.testing.assert_close(retrieved_values, expected)
    assert torch.equal(baseline.get_kv(token_idx=10)[1], values[10])
    stats = cache.compression_stats()
    assert stats["compression_ratio"] == pytest.approx(128 / 48) == stats["reported_compression_ratio"]
    assert baseline.nbytes() / cache.nbytes() == pytest.approx(128 / 48)
    assert len(cache) == values.shape[0] and cache.get_kv()[0].shape == keys.shape
    # Explicit reconstruction matrices instead of a profile, in a second stream.
    up = builder.get_profile("med")["value_reconstruction"][0]
    store = LLaMAKVCache()
    store.store_kv(
        keys[:4], builder.compress_values(values[:4], "med"), {"value_reconstruction": up}, layer_idx=0, head_idx=2
    )
    assert store.get_kv(token_idx=-1, head_idx=2)[1].shape == (64,)
    with pytest.raises(IndexError, match="token_idx 4 out of range"):
        store.get_kv(token_idx=4, head_idx=2)
    with pytest.raises(ValueError, match="no profile_builder"):
        store.store_kv(keys[0], values[0], {"profile": "med"})


def test_decoder_and_full_forward(loader):
    # At full rank the compressed cache is exact: greedy tokens match the full cache's.
    exact = LLaMACompressionProfileBuilder(
        loader, CompressionConfig(value_compression_ranks={"full": 64}, key_compression_rank=64)
    )
    decoder = CompressedAutoregressiveDecoder(InferenceConfig(max_sequence_length=64, temperature=0.0), loader, exact)
    compressed = decoder.generate(prompt="The capital of France is", max_length=20, use_compression=True)
    full = decoder.generate(prompt="The capital of France is", max_length=20, use_compression=False)
    assert compressed.tokens == full.tokens and compressed.text == full.text and "Paris" in full.text
    assert compressed.prompt_tokens + len(compressed.tokens) <= 20
    assert full.kv_bytes_per_token == 30 * 3 * 128 * 4  # fp32 keys + values
    assert compressed.kv_bytes_per_token == 30 * 3 * 128 * 4 + 30 * 4  # + positions: full rank saves nothing
    batch = decoder.generate(["Hello", "The capital of France is"], max_length=20)
    assert len(batch) == 2 and batch[1].tokens == compressed.tokens  # left padding leaves the longest row alone
    with pytest.raises(ValueError, match="max_length 100 exceeds InferenceConfig.max_sequence_length 64"):
        decoder.generate("Hello", max_length=100)
    with pytest.raises(ValueError, match="leaves no room to generate"):
        decoder.generate("Hello there", max_length=2)
    sampled = CompressedAutoregressiveDecoder(
        InferenceConfig(max_sequence_length=64, temperature=0.7, seed=3), loader, exact
    )
    assert sampled.generate("Hello", max_new_tokens=6).tokens == sampled.generate("Hello", max_new_tokens=6).tokens

    halved = LLaMACompressionProfileBuilder(
        loader, CompressionConfig(value_compression_ranks={"med": 64}, key_compression_rank=32)
    )
    forward_pass = LLaMAFullForward(loader, halved)
    input_ids = loader.tokenizer("Paris is the capital and largest city of France.", return_tensors="pt")["input_ids"]
    outputs = forward_pass.forward(input_ids, use_compression=True)
    assert isinstance(outputs.past_key_values, SVDCompressedCache)
    assert outputs.logits.shape == (1, input_ids.shape[1], 49152)
    step = forward_pass.forward(input_ids[:, -1:], past_key_values=outputs.past_key_values)
    assert outputs.past_key_values.get_seq_length() == input_ids.shape[1] + 1 and step.logits.shape[1] == 1
    report = forward_pass.compare(input_ids)
    assert report["memory_savings"] == pytest.approx(1 - (30 * 3 * 96 * 4 + 30 * 4) / (30 * 3 * 128 * 4))
    assert 0.3 < report["top1_agreement"] <= 1 and report["max_abs_logit_diff"] > 0
    assert LLaMAFullForward(loader, exact).compare(input_ids)["top1_agreement"] == 1.0


def test_dataset_processor(loader):
    processor = LLaMADatasetProcessor(loader)
    with pytest.warns(UserWarning, match="cannot load wikitext.*using the offline 'wiki' corpus"):
        dataset = processor.load_dataset("wikitext")
    assert processor.source == "wiki" and len(dataset) > 100 and all(doc.strip() for doc in dataset)
    processed = processor.preprocess_for_compression(dataset, max_length=64, num_samples=3)
    assert processed["input_ids"].shape == (3, 64) and processed["input_ids"].max() < 49152
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(processor.load_dataset("lee")) == 300  # offline: no warning
    with pytest.raises(ValueError, match="fewer than one window"):
        processor.preprocess_for_compression(["Hello"], max_length=64)


def test_memory_manager_cpu_and_cuda(monkeypatch):
    with pytest.raises(ValueError, match="cleanup_threshold must be a fraction"):
        MemoryManager(cleanup_threshold=1.5)
    never, always = MemoryManager(cleanup_threshold=1.0), MemoryManager(cleanup_threshold=0.0)
    assert not never.cleanup_if_needed() and always.cleanup_if_needed() and always.cleanups == 1
    with always.managed_computation() as record:
        torch.ones(1000).sum()
    assert record["seconds"] >= 0 and always.history == [record] and always.cleanups == 2
    assert 0 < always.usage_fraction() < 1

    # The CUDA branch, on a simulated device: usage comes from the driver, cleanup empties PyTorch's cache.
    reserved = {"bytes": 6 << 30}
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (1 << 30, 8 << 30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 4 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: reserved["bytes"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 5 << 30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)

    def empty_cache() -> None:
        emptied.append(True)
        reserved["bytes"] = 4 << 30

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    manager = MemoryManager(cleanup_threshold=0.8)
    assert manager.memory_usage()["cuda"][0]["used_fraction"] == pytest.approx(7 / 8)
    assert manager.cleanup_if_needed() and emptied  # 87.5% used >= 80%
    assert manager.cleanup()["cuda_bytes_released"] == 0  # already released
    with manager.managed_computation() as record:
        pass
    assert record["cuda_peak_allocated_bytes"] == {0: 5 << 30}


def test_interfaces_are_abstract():
    from hf_svdkv.interfaces import CompressionInterface

    assert issubclass(ModelLoaderInterface, ABC) and issubclass(CompressionInterface, ABC)
    with pytest.raises(TypeError, match="abstract"):
        ModelLoaderInterface()
    with pytest.raises(TypeError, match="abstract"):
        CompressionInterface()

    class DictLoader(ModelLoaderInterface):
        def load_model(self) -> None:
            pass

        def get_model_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
            return {
                f"self_attn.{p}.weight": torch.full((2, 2), float(i))
                for i, p in enumerate(["q_proj", "k_proj", "v_proj", "o_proj"])
            }

    assert DictLoader().get_attention_weights(0)["v_proj"][0, 0] == 2.0


# --- core.model's configuration view and layer-by-layer loader --------------------------------------------------------
def test_model_config_wrapper_gives_one_view_of_any_config(tmp_path):
    from hf_svdkv.model import ModelConfigWrapper

    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3)
    model.save_pretrained(tmp_path)
    wrapper = ModelConfigWrapper(model.config)
    assert (wrapper.num_layers, wrapper.num_heads, wrapper.num_kv_heads, wrapper.head_dim) == (3, 4, 2, 32)
    assert wrapper.heads_per_kv_head == 2 and wrapper.kv_bytes_per_token == 2 * 3 * 2 * 32 * 2
    assert wrapper.vocab_size == model.config.vocab_size and wrapper.max_position_embeddings == 512
    assert ModelConfigWrapper(str(tmp_path)).to_dict() == ModelConfigWrapper(model).to_dict() == wrapper.to_dict()
    from transformers import GPT2Config

    with pytest.raises(hf_svdkv.UnsupportedModelError, match="gpt2"):
        ModelConfigWrapper(GPT2Config())


def test_llama3_loader_reads_attention_weights_one_layer_at_a_time(tmp_path):
    from hf_svdkv.model import LLaMA3Loader

    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3)
    model.save_pretrained(tmp_path)
    loader = LLaMA3Loader(str(tmp_path))
    layers = dict(loader.iter_layers())
    assert sorted(layers) == [0, 1, 2]
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        # Only attention weights (and qwen2's q/k/v biases) are read: never the MLP, never the whole model.
        assert set(layers[index]) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "q_proj.bias",
            "k_proj.bias",
            "v_proj.bias",
        }
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(layers[index][name], getattr(attention, name).weight)
        assert torch.equal(layers[index]["k_proj.bias"], attention.k_proj.bias)
    data = loader.load_model_data(layers=[1])
    assert list(data["layers"]) == [1] and data["config"]["num_layers"] == 3
    with pytest.raises(IndexError, match="layer 3 out of range"):
        loader.layer_weights(3)
    with pytest.raises(FileNotFoundError, match="no local checkpoint"):
        LLaMA3Loader(str(tmp_path / "missing"))


@pytest.mark.slow
def test_llama3_loader_on_the_default_model(default_model):
    from hf_svdkv.model import LLaMA3Loader
    from hf_svdkv.tools.loading import ModelConfig

    model, _ = default_model
    loader = LLaMA3Loader(ModelConfig(dtype="float32"))
    assert loader.config.num_layers == 30 and loader.config.kv_bytes_per_token == 23040
    assert torch.equal(loader.layer_weights(29)["v_proj"], model.model.layers[29].self_attn.v_proj.weight)
