"""The line a user tries first: `patch_model(model, CompressionConfig(...))` fits calibrated bases by itself, fast,
caches them, says what it did, and gives what the full cache gives on the real default model."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import VOCAB, structured_ids, tiny_model, weights_config
from transformers import PreTrainedTokenizerFast

import hf_svdkv
from hf_svdkv import CompressionConfig, SVDBases, SVDCompressedCache, fit_bases, patch_model, unpatch_model
from hf_svdkv.bases import BASES_FILE
from hf_svdkv.bases_cache import cache_folder, entry_key

pytest_plugins = ["fixtures_real"]


@pytest.fixture
def log_lines():
    """What the library logger says during a test (it does not propagate to pytest's root handler)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("hf_svdkv")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def calibration_ids(count: int = 2048) -> torch.Tensor:
    return torch.cat([structured_ids(256, seed=s)[0] for s in range(count // 256)])


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: "w0 w1 ..." -> ids 1, 2, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def word_text(tokens: int) -> str:
    return " ".join(f"w{(i * 7 + i // 13) % (VOCAB - 1)}" for i in range(tokens))


# --- defaults ---------------------------------------------------------------------------------------------------------
def test_a_bare_config_is_calibrated_4x_mixed_with_a_window():
    config = CompressionConfig()
    fields = (config.method, config.target_ratio, config.latent_bits, config.window, config.calibration)
    assert fields == ("calibrated", 4.0, "mixed", 32, "fast") and config.exact_prefill and config.sinks == 4
    # Mixed widths are the default wherever a ratio is spent on calibrated bases; ranks keep 16-bit latents.
    assert (CompressionConfig(target_ratio=2).latent_bits, CompressionConfig(target_ratio=2).window) == ("mixed", 32)
    for ranked in (
        CompressionConfig(key_rank=8, value_rank=8),
        CompressionConfig(profile="low"),
        CompressionConfig(target_ratio=2, method="weights"),
    ):
        assert (ranked.latent_bits, ranked.window) == (None, 128)
    explicit = CompressionConfig(target_ratio=6, latent_bits=4, window=64)
    assert (explicit.latent_bits, explicit.window) == (4, 64)
    assert CompressionConfig(target_ratio=2, latent_bits=None).window == 128
    assert config.heads_per_group(4) == 4  # calibrated: the whole layer shares a basis
    assert CompressionConfig(method="weights", target_ratio=2).heads_per_group(4) == 1
    # The older API keeps its own defaults: weight-only bases, no window, no default ratio.
    from hf_svdkv.config import CompressionConfig as SeedConfig

    assert issubclass(SeedConfig, CompressionConfig)
    assert (SeedConfig(profile="med").method, SeedConfig(profile="med").window) == ("weights", 0)
    with pytest.raises(ValueError, match="give both key_rank and value_rank"):
        SeedConfig()


def test_patch_model_calibrates_by_itself_and_caches(tmp_path, log_lines):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=2)
    config = CompressionConfig(target_ratio=2.0, window=4)
    patch_model(model, config, calibration_text=calibration_ids(), bases_cache=tmp_path)
    bases = hf_svdkv.patch.patch_state(model).settings.bases
    assert bases.method == "calibrated" and bases.group_size == 2
    assert any("calibrated bases (fast: 2,048 tokens" in line and "cache miss" in line for line in log_lines)
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / BASES_FILE).is_file()
    with torch.no_grad():
        out = model.generate(structured_ids(12), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, SVDCompressedCache)

    log_lines.clear()
    unpatch_model(model)
    patch_model(model, config, calibration_text=calibration_ids(), bases_cache=tmp_path)
    assert any("loaded from the cache" in line and "cache hit" in line for line in log_lines)
    again = hf_svdkv.patch.patch_state(model).settings.bases
    assert all(torch.equal(a.key.down, b.key.down) for a, b in zip(again.layers, bases.layers, strict=True))

    # Another text, another config or other weights: another entry.
    keys = {
        entry_key(model, config, calibration_ids()),
        entry_key(model, CompressionConfig(target_ratio=3.0), calibration_ids()),
        entry_key(model, config, calibration_ids(4096)),
        entry_key(tiny_model("llama", seed=1), config, calibration_ids()),
    }
    assert len(keys) == 4


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch, log_lines):
    model = tiny_model("llama", num_layers=2)
    fit_bases(
        model, CompressionConfig(key_rank=16, value_rank=16), calibration_text=calibration_ids(), bases_cache=False
    )
    assert any("bases cache off" in line for line in log_lines)
    monkeypatch.setenv("HF_SVDKV_BASES_CACHE", "0")
    assert cache_folder(True) is None and cache_folder(tmp_path) is None
    fit_bases(
        model, CompressionConfig(key_rank=16, value_rank=16), calibration_text=calibration_ids(), bases_cache=tmp_path
    )
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("HF_SVDKV_BASES_CACHE", str(tmp_path / "elsewhere"))
    assert cache_folder(True) == tmp_path / "elsewhere"


def test_a_corrupt_or_foreign_entry_is_refitted(tmp_path, log_lines):
    model = tiny_model("llama", num_layers=2)
    config = CompressionConfig(key_rank=16, value_rank=16)
    ids = calibration_ids()
    good = fit_bases(model, config, calibration_text=ids, bases_cache=tmp_path)
    entry = tmp_path / entry_key(model, config, ids)
    (entry / BASES_FILE).write_bytes((entry / BASES_FILE).read_bytes()[:-100])  # truncated
    log_lines.clear()
    refitted = fit_bases(model, config, calibration_text=ids, bases_cache=tmp_path)
    assert any("unusable" in line for line in log_lines) and any("cache miss" in line for line in log_lines)
    assert torch.equal(refitted.layers[0].value.up, good.layers[0].value.up)
    # An entry holding bases of other weights (a copied folder, a hash collision) fails validation: refitted.
    other = tiny_model("llama", num_layers=2, seed=3)
    SVDBases.from_model(other, weights_config(key_rank=16, value_rank=16)).save_pretrained(entry)
    log_lines.clear()
    fit_bases(model, config, calibration_text=ids, bases_cache=tmp_path)
    assert any("unusable" in line and "do not match" in line for line in log_lines)
    SVDBases.from_pretrained(entry).validate(model)  # overwritten with the right ones


def test_calibration_text_as_strings_with_a_tokenizer(tmp_path):
    model = tiny_model("llama", num_layers=2)
    tokenizer = word_tokenizer()
    bases = fit_bases(
        model,
        CompressionConfig(key_rank=16, value_rank=16),
        tokenizer=tokenizer,
        calibration_text=[word_text(1200), word_text(1200)],
        bases_cache=False,
    )
    assert bases.method == "calibrated"
    # The tokenizer saved with the model is found through name_or_path.
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model.name_or_path = str(tmp_path)
    assert (
        fit_bases(
            model, CompressionConfig(key_rank=16, value_rank=16), calibration_text=word_text(2500), bases_cache=False
        ).method
        == "calibrated"
    )


def test_bad_input_says_what_to_do():
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="needs a tokenizer.*pass tokenizer="):
        patch_model(model, CompressionConfig(), calibration_text="w1 w2 w3", bases_cache=False)
    with pytest.raises(ValueError, match="too short: 1,000 tokens.*needs at least 2,048"):
        patch_model(model, calibration_text=calibration_ids()[:1000], bases_cache=False)
    with pytest.raises(ValueError, match="unknown calibration 'slow'"):
        CompressionConfig(calibration="slow")
    with pytest.raises(ValueError, match="not both"):
        patch_model(
            model, CompressionConfig(), bases=SVDBases.from_model(model, weights_config(key_rank=8, value_rank=8))
        )


def test_progress_follows_transformers_switch(capsys):
    from transformers.utils import logging as hf_logging

    model = tiny_model("llama", num_layers=2)
    hf_logging.disable_progress_bar()
    try:
        fit_bases(
            model, CompressionConfig(key_rank=16, value_rank=16), calibration_text=calibration_ids(), bases_cache=False
        )
    finally:
        hf_logging.enable_progress_bar()
    assert "calibration" not in capsys.readouterr().err
    fit_bases(
        model, CompressionConfig(key_rank=16, value_rank=16), calibration_text=calibration_ids(), bases_cache=False
    )
    assert "calibration" in capsys.readouterr().err


# --- the real default model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_model():
    from hf_svdkv.tools.loading import ModelConfig, load_model

    return load_model(ModelConfig(dtype="bfloat16"))


@pytest.mark.slow
def test_one_liner_says_what_the_full_cache_says(bf16_model, tmp_path_factory):
    """Held-out prompts (the Lee news corpus: neither the calibration text nor its domain) of 1,536 tokens: the
    one-line 4x cache predicts the full cache's greedy continuation at >= 80% of positions, and its own greedy
    text is words. Weight-only bases, the data-free alternative, are measured the same way: the gap is the point."""
    from hf_svdkv.text import load_text, tokenize_text
    from hf_svdkv.tools.agreement import (
        corpus_vocabulary,
        greedy_continuations,
        next_token_agreement,
        non_word_share,
        spread_prompts,
    )
    from hf_svdkv.tools.generate import greedy

    model, tokenizer = bf16_model
    lee = load_text("lee")
    prompts = spread_prompts(tokenize_text(tokenizer, lee, model.config.vocab_size), 6, 1536)
    references = greedy_continuations(model, prompts, 32)
    vocabulary = corpus_vocabulary(lee, load_text("wiki"))
    folder = tmp_path_factory.mktemp("bases")
    measured = {}
    for name, config in (
        ("one-liner", CompressionConfig()),
        ("weights", CompressionConfig(key_rank=32, value_rank=32, method="weights")),
    ):
        patch_model(model, config, tokenizer=tokenizer, bases_cache=folder)
        try:
            agreement = next_token_agreement(model, prompts, lambda: SVDCompressedCache(model), references)
            answer, _, _ = greedy(model, prompts[0][None], SVDCompressedCache(model), 48, {2})
        finally:
            unpatch_model(model)
        measured[name] = (agreement.mean, non_word_share(tokenizer.decode(answer), vocabulary))
    print(measured)
    assert measured["one-liner"][0] >= 0.80
    assert measured["one-liner"][1] < 0.15
    # The gap weight-only bases leave (measured: 0.95 vs 0.72 with the default window and 4 sinks, 0.93 vs 0.61 with
    # the window alone; docs/oneliner.md).
    assert measured["weights"][0] < measured["one-liner"][0] - 0.15


@pytest.mark.slow
def test_generate_command_shows_both_side_by_side(capsys, monkeypatch, tmp_path):
    from hf_svdkv.tools.cli import main

    monkeypatch.setenv("HF_SVDKV_BASES_CACHE", str(tmp_path))
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "DynamicCache" in out and "hf_svdkv calib-4x-w32-mixed" in out and "tokens/s" in out and "KV ratio" in out
