"""Calibration in the eval command: disjoint from the scored text, saved bases reproduce the ppl, CLI wiring."""

from __future__ import annotations

import argparse

import pytest
import torch

import hf_svdkv.text
from hf_svdkv import CompressionConfig, SVDBases
from hf_svdkv.text import make_windows
from hf_svdkv.tools.cli import _eval_configs, _single_config, _token_ids, main
from hf_svdkv.tools.eval import build_rows, row_name, run_eval, svd_row

pytest_plugins = ["fixtures_real"]


class _Model:
    class config:  # noqa: N801 - mimics a transformers config object
        @staticmethod
        def get_text_config():
            return argparse.Namespace(vocab_size=10**9)


def test_calibration_tokens_are_never_scored(monkeypatch):
    # Token ids equal to their position in the corpus make any overlap visible as a shared value.
    corpus = 50_000
    monkeypatch.setattr(hf_svdkv.text, "tokenize_text", lambda tokenizer, text, vocab_size=None: torch.arange(corpus))
    monkeypatch.setattr(hf_svdkv.text, "load_text", lambda dataset="wiki", text_file=None: "unused")
    args = argparse.Namespace(calib_text=None, calib_tokens=8192, dataset="wiki")
    ids, calib_ids = _token_ids(args, tokenizer=None, model=_Model())
    assert calib_ids.numel() == 8192 and ids.numel() + calib_ids.numel() == corpus
    windows = make_windows(ids, 2048, 20)
    scored = torch.cat(windows)
    assert scored.max() < calib_ids.min()
    assert not set(scored.tolist()) & set(calib_ids.tolist())


def test_cli_rows_are_the_product_of_the_flags():
    args = argparse.Namespace(
        target_ratio=["2,3"],
        profiles=None,
        ranks="32:32",
        bases_dir=[],
        method="weights,calibrated",
        window="0,64",
        latent_bits="none,4",
        group_size=None,
        calibration="fast",
        sinks="0,4",
    )
    configs = _eval_configs(args, num_kv_heads=3)
    assert len(configs) == 3 * 2 * 2 * 2 * 2
    calibrated = [c for c in configs if c.method == "calibrated"]
    assert {c.group_size for c in calibrated} == {3}  # calibrated bases default to joint
    assert {c.group_size for c in configs if c.method == "weights"} == {1}
    names = [row.name for row in build_rows(configs=configs, calibrated_bases=lambda model, config: None)]
    assert "calib-2x-g3-w64-int4" in names and "svd-k32-v32" in names and len(set(names)) == len(names)
    assert "calib-3x-g3-w64-s4" in names


def test_cli_sinks_apply_to_the_recommended_rows():
    args = argparse.Namespace(
        target_ratio=[], profiles=None, ranks=None, bases_dir=[], method=None, window=None, latent_bits=None
    )
    args.group_size, args.calibration, args.sinks = None, "fast", "0,16"
    configs = _eval_configs(args, num_kv_heads=3)
    assert [c.sinks for c in configs] == [0, 16] * 2
    assert row_name(configs[1]) == "calib-4x-g3-w32-mixed-s16"


def test_cli_single_config_follows_compression_config():
    """`generate` / `bases` without --window or --latent-bits: calibrated bases get CompressionConfig's defaults,
    weight-only ones no window (as their eval rows)."""
    fields = dict(target_ratio=[], profile=None, ranks=None, window=None, latent_bits=None, group_size=None)
    fields.update(calibration="fast", sinks=None)
    default = _single_config(argparse.Namespace(**fields, method=None))
    assert (default.target_ratio, default.latent_bits, default.window) == (4.0, "mixed", 32)
    weights = _single_config(argparse.Namespace(**{**fields, "ranks": "8:8"}, method="weights"))
    assert (weights.latent_bits, weights.window) == (None, 0)
    explicit = _single_config(argparse.Namespace(**{**fields, "window": "64", "latent_bits": "4"}, method=None))
    assert (explicit.latent_bits, explicit.window) == (4, 64)


def test_cli_rejects_bad_compression_flags(capsys):
    for argv, message in [
        (["eval", "--target-ratio", "two"], "--target-ratio takes numbers"),
        (["eval", "--target-ratio", "2", "--method", "magic"], "unknown --method 'magic'"),
        (["eval", "--target-ratio", "2", "--latent-bits", "3"], "latent_bits must be one of"),
        (["eval", "--window", "64"], "need rows to apply to"),
        (["eval", "--sinks", "four"], "--sinks takes comma-separated integers"),
        (["eval", "--sinks", "-4"], "sinks must be a non-negative integer"),
        (["bases", "/tmp/x", "--ranks", "8:8", "--target-ratio", "2"], "give at most one of"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err.splitlines()[-1], err


@pytest.mark.slow
def test_saved_calibrated_bases_reproduce_the_same_ppl(default_model, wiki_text, tmp_path):
    from hf_svdkv.text import split_calibration, tokenize_text

    model, tokenizer = default_model
    ids = tokenize_text(tokenizer, wiki_text[:200_000], model.config.vocab_size)
    calib_ids, eval_ids = split_calibration(ids, 4096)
    config = CompressionConfig(target_ratio=2.0, group_size=3, window=16)
    bases = SVDBases.calibrate(model, calib_ids, config, progress=False, allocation="spectrum")
    bases.save_pretrained(tmp_path)
    reloaded = SVDBases.from_pretrained(tmp_path)

    rows = [
        svd_row("memory", config=config, bases_factory=lambda model, config: bases),
        svd_row("disk", bases_dir=tmp_path, window=16),
    ]
    result = run_eval(
        model, eval_ids, [*build_rows(), *rows][:1] + rows, context=384, continuation=128, n_windows=1, progress=False
    )
    ppl = {row.name: row.ppl for row in result.rows}
    assert ppl["memory"] == ppl["disk"]
    assert reloaded.method == "calibrated" and reloaded.key_ranks == bases.key_ranks
    assert 1.0 < result.rows[1].compression_ratio  # window and positions counted, still smaller than dynamic
