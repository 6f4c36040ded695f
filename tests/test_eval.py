"""Perplexity evaluation, KV byte counting and the `eval` CLI.

Fast tests run on a tiny random Llama (no download); the last test runs the real default model end to end.
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import weights_config
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, QuantizedCache

from hf_svdkv.tools.cli import main
from hf_svdkv.tools.eval import (
    EvalResult,
    EvalRow,
    RowSpec,
    build_rows,
    dynamic_row,
    parse_ranks,
    plot,
    quantized_row,
    run_eval,
    svd_row,
)
from hf_svdkv.tools.memory import cache_nbytes, tensor_nbytes

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 4, 2, 16, 128
ROW_KEYS = {"name", "ppl", "delta_pct", "kv_bytes_per_token", "compression_ratio", "seconds"}
GROUP = 64  # QuantizedCache's default q_group_size
HAS_QUANTO = find_spec("optimum") is not None and find_spec("optimum.quanto") is not None
HAS_HQQ = find_spec("hqq") is not None


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=4 * HEADS * HEAD_DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        initializer_range=0.08,  # peaked attention, so cache errors would show in the logits
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))


def fill(cache, model, tokens: int, then: int = 0):
    ids = torch.randint(0, VOCAB, (1, tokens + then), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(ids[:, :tokens], past_key_values=cache, use_cache=True)
        if then:
            model(ids[:, tokens:], past_key_values=cache, use_cache=True)
    return cache


def full_precision_bytes(tokens: int, element_size: int) -> int:
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * element_size


def quantized_bytes(tokens: int, nbits: int, element_size: int) -> int:
    """Packed data plus one scale and one zero-point / shift per group of GROUP values, for K and V of every layer."""
    values = KV_HEADS * HEAD_DIM * tokens
    return LAYERS * 2 * (values * nbits // 8 + 2 * (values // GROUP) * element_size)


# --- byte counting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_cache_bytes_are_exact(dtype):
    model = tiny_llama(dtype)
    cache = fill(DynamicCache(config=model.config), model, 100, then=7)
    expected = full_precision_bytes(107, torch.tensor([], dtype=dtype).element_size())
    assert cache_nbytes(cache) == expected
    assert sum(tensor_nbytes(layer.keys) + tensor_nbytes(layer.values) for layer in cache.layers) == expected


def quantized_cache(model, backend: str, nbits: int) -> QuantizedCache:
    axes = {"axis_key": 1, "axis_value": 1} if backend == "hqq" else {}
    return QuantizedCache(backend=backend, config=model.config, nbits=nbits, **axes)


BACKENDS = [
    pytest.param("quanto", marks=pytest.mark.skipif(not HAS_QUANTO, reason="optimum-quanto not installed")),
    pytest.param("hqq", marks=pytest.mark.skipif(not HAS_HQQ, reason="hqq not installed")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nbits", [2, 4])
def test_quantized_cache_counts_data_scales_and_residual(model, backend, nbits):
    # A prefill is quantized whole; the next few tokens stay full precision in the residual window.
    prefill, extra = 256, 10
    cache = fill(quantized_cache(model, backend, nbits), model, prefill)
    assert cache_nbytes(cache) == quantized_bytes(prefill, nbits, 4)
    cache = fill(quantized_cache(model, backend, nbits), model, prefill, then=extra)
    assert cache_nbytes(cache) == quantized_bytes(prefill, nbits, 4) + full_precision_bytes(extra, 4)


def test_quantized_caches_are_smaller_than_dynamic():
    model = tiny_llama(torch.bfloat16)
    tokens = 256  # hqq's 2-bit packing needs the number of groups to be a multiple of 4
    dynamic = cache_nbytes(fill(DynamicCache(config=model.config), model, tokens))
    backends = ["quanto"] * HAS_QUANTO + ["hqq"] * HAS_HQQ
    if not backends:
        pytest.skip("no quantization backend installed")
    for backend in backends:
        int2, int4 = (cache_nbytes(fill(quantized_cache(model, backend, n), model, tokens)) for n in (2, 4))
        assert int2 < int4 < dynamic
    if HAS_HQQ:  # quanto only offers 2 and 4 bits
        int8 = cache_nbytes(fill(quantized_cache(model, "hqq", 8), model, tokens))
        assert int4 < int8 < dynamic


def test_cache_with_nbytes_method_is_trusted():
    class Counted:
        def nbytes(self) -> int:
            return 1234

    assert cache_nbytes(Counted()) == 1234


def test_shared_storage_counted_once():
    keys = torch.zeros(1, KV_HEADS, 10, HEAD_DIM)
    assert cache_nbytes(((keys, keys), (keys[:, :, :5], keys))) == tensor_nbytes(keys)


# --- protocols --------------------------------------------------------------------------------------------------
def reference_ppl(model, windows: list[torch.Tensor], first_scored: int) -> float:
    """ppl of tokens first_scored.. of each window from one cache-free forward over the whole window."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(window[None], use_cache=False).logits[0].float()
            nll += F.cross_entropy(logits[first_scored - 1 : -1], window[first_scored:], reduction="sum").item()
            count += window.numel() - first_scored
    return math.exp(nll / count)


def test_continuation_protocol_scores_the_continuation(model, ids):
    from hf_svdkv.text import make_windows

    result = run_eval(model, ids, [dynamic_row()], context=96, continuation=32, n_windows=3, progress=False)
    expected = reference_ppl(model, make_windows(ids, 128, 3), first_scored=96)
    (row,) = result.rows
    assert row.ppl == pytest.approx(expected, rel=1e-5)
    assert (row.delta_pct, row.compression_ratio) == (0.0, 1.0)
    assert row.kv_bytes_per_token == full_precision_bytes(1, 4)
    assert result.settings["scored_tokens_per_window"] == 32


def test_sliding_protocol_skips_the_first_chunk(model, ids):
    from hf_svdkv.text import make_windows

    result = run_eval(
        model, ids, [dynamic_row()], protocol="sliding", window_len=100, chunk=32, n_windows=2, progress=False
    )
    expected = reference_ppl(model, make_windows(ids, 100, 2), first_scored=32)
    assert result.rows[0].ppl == pytest.approx(expected, rel=1e-5)
    assert result.settings["scored_tokens_per_window"] == 68


def test_full_rank_svd_matches_dynamic_and_lower_rank_compresses(model, ids):
    from hf_svdkv import is_patched

    rows = [
        dynamic_row(),
        svd_row("full", config=weights_config(key_rank=HEAD_DIM, value_rank=HEAD_DIM)),
        svd_row("half", config=weights_config(key_rank=HEAD_DIM // 2, value_rank=HEAD_DIM // 2)),
    ]
    result = run_eval(model, ids, rows, context=64, continuation=32, n_windows=2, progress=False)
    base, full, half = result.rows
    assert full.ppl == pytest.approx(base.ppl, rel=1e-4)
    assert half.compression_ratio > full.compression_ratio
    assert half.kv_bytes_per_token < base.kv_bytes_per_token
    assert not is_patched(model)  # every row restores the model


def test_teardown_runs_when_a_row_fails(model, ids):
    torn_down = []

    def broken_setup(model):
        def factory():
            raise RuntimeError("boom")

        return factory

    rows = [dynamic_row(), RowSpec("broken", setup=broken_setup, teardown=torn_down.append)]
    with pytest.raises(RuntimeError, match="boom"):
        run_eval(model, ids, rows, context=32, continuation=16, n_windows=1, progress=False)
    assert torn_down == [model]


@pytest.mark.skipif(not (HAS_QUANTO or HAS_HQQ), reason="no quantization backend installed")
def test_quantized_peer_row_compresses(model, ids):
    backend = "quanto" if HAS_QUANTO else "hqq"
    rows = [dynamic_row(), quantized_row(backend, 4)]
    # A continuation of at least residual_length (128) tokens flushes the full-precision residual window,
    # so at the end of the window every token is quantized.
    result = run_eval(model, ids, rows, context=128, continuation=128, n_windows=1, progress=False)
    peer = result.rows[1]
    assert peer.name == "quantized-int4"
    # fp32 cache: 4-bit codes plus a 32-bit scale and shift per 64 values = 5 bits per value.
    assert peer.compression_ratio == pytest.approx(32 / (4 + 2 * 32 / GROUP))
    assert math.isfinite(peer.ppl)


@pytest.mark.skipif(not HAS_QUANTO, reason="optimum-quanto not installed")
def test_kivi_axes_peer_rows(model, ids):
    """KIVI's axes: keys per channel over groups of tokens, values per token, on token counts that are multiples of
    the group and on others (the tokens short of a group wait in the residual, as in KIVI)."""
    from hf_svdkv.tools.eval import PEERS

    rows = [dynamic_row(), *(quantized_row("quanto", bits, name, **kwargs) for name, bits, kwargs in PEERS["quanto"])]
    assert [row.name for row in rows[1:]] == [
        "quantized-int4",
        "quantized-int2",
        "kivi-int4",
        "kivi-int2-g32",
        "kivi-int2-g64",
    ]
    result = run_eval(model, ids, rows, context=128, continuation=128, n_windows=1, progress=False)
    assert all(math.isfinite(row.ppl) and row.compression_ratio > 1 for row in result.rows[1:])
    kivi = [quantized_row("quanto", 2, "kivi-int2-g64", **PEERS["quanto"][4][2])]
    odd = run_eval(model, ids, [dynamic_row(), *kivi], context=100, continuation=29, n_windows=1, progress=False)
    assert math.isfinite(odd.rows[1].ppl) and odd.rows[1].compression_ratio > 1


@pytest.mark.skipif(not HAS_QUANTO, reason="optimum-quanto not installed")
def test_kivi_layer_quantizes_whole_groups_and_equals_quanto_on_multiples():
    from transformers.cache_utils import QuantoQuantizedLayer

    from hf_svdkv.tools.kivi import KiviQuantoLayer

    axes = {"nbits": 2, "axis_key": -1, "axis_value": 0, "q_group_size": 32, "residual_length": 128}
    torch.manual_seed(0)
    steps = [torch.randn(1, 2, n, 16) for n in (256, *[1] * 130, 40)]
    stock, kivi = QuantoQuantizedLayer(**axes), KiviQuantoLayer(**axes)
    for states in steps[:-1]:  # every flush of the stock layer lands on a whole number of groups here
        expected, got = stock.update(states, states), kivi.update(states, states)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    kivi = KiviQuantoLayer(**axes)
    prompt = steps[0][:, :, :250]
    keys, _ = kivi.update(prompt, prompt)
    assert torch.equal(keys, prompt)  # a prompt is attended at full precision, as by the stock layer
    assert kivi.keys.shape[-2] == 250 % 32 and torch.equal(kivi.keys, prompt[:, :, 224:])
    keys, _ = kivi.update(steps[-1], steps[-1])
    assert keys.shape[-2] == 290 and kivi.get_seq_length() == 290
    assert (keys[:, :, :224] - prompt[:, :, :224]).abs().max() < 1.5  # 2-bit codes, 4 levels per group of 32
    assert torch.equal(keys[:, :, 224:250], prompt[:, :, 224:])
    assert cache_nbytes(SimpleNamespace(layers=[kivi])) > 2 * 26 * 2 * 16 * 4  # the residual's bytes are counted


@pytest.mark.skipif(not HAS_HQQ, reason="hqq not installed")
def test_hqq_unpackable_sizes_fail_before_the_baseline(model, ids):
    # 2 KV heads x 16 dims x 26 tokens / 64 per group = 13 groups: hqq's 2-bit packing needs a multiple of 4.
    rows = [RowSpec("must-not-run", setup=lambda model: pytest.fail("ran a row")), quantized_row("hqq", 2)]
    with pytest.raises(ValueError, match="hqq backend cannot quantize int2"):
        run_eval(model, ids, rows, context=26, continuation=6, n_windows=1, progress=False)


# --- rows, JSON, plot ---------------------------------------------------------------------------------------------
def test_parse_ranks():
    assert parse_ranks("32:32, 16:48") == [(32, 32), (16, 48)]
    for bad in ("32", "32:x", "32:32:1", "", "-1:4"):
        with pytest.raises(ValueError, match="--ranks"):
            parse_ranks(bad)


def test_build_rows_names():
    names = [r.name for r in build_rows(profiles=["low"], ranks=[(8, 4)], group_size=2, bases_dirs=["/x/my-bases"])]
    assert names == ["dynamic", "svd-low-g2-s4", "svd-k8-v4-g2-s4", "bases:my-bases"]  # 4 sinks: the default


def sample_result() -> EvalResult:
    rows = [
        EvalRow("dynamic", 10.0, 0.0, 100.0, 1.0, 1.5),
        EvalRow("svd-low", 2e4, 2e5, 25.0, 4.0, 2.0),
        EvalRow("bad", math.inf, math.inf, 10.0, 10.0, 1.0),
    ]
    return EvalResult("tiny", "wiki", "continuation", rows, {"windows": 3})


def test_json_schema():
    data = json.loads(sample_result().to_json())
    assert {"model", "dataset", "protocol", "rows"} <= set(data)
    assert all(set(row) == ROW_KEYS for row in data["rows"])
    assert data["rows"][2]["ppl"] is None  # inf is not JSON


def test_plot_writes_file(tmp_path):
    path = plot(sample_result(), tmp_path / "eval.png")
    assert path.stat().st_size > 0


# --- CLI errors -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama plus a word-level tokenizer saved to disk, so the CLI loads it like any local model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(VOCAB - 1)]
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)
    return directory


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{(i * 7) % (VOCAB - 1)}" for i in range(600)))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    # Loaders may draw progress bars on stderr first; the error itself is one final line.
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("hf-svdkv: error: "), err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.mark.parametrize("ranks", ["32", "a:b", "8:8:8"])
def test_cli_bad_ranks_syntax(capsys, ranks):
    code, err = run_cli(["eval", "--ranks", ranks], capsys)
    assert code == 2
    assert_one_line_error(err, "--ranks")


def test_cli_unreadable_text_file(capsys, tmp_path):
    code, err = run_cli(["eval", "--text-file", str(tmp_path / "missing.txt")], capsys)
    assert code == 2
    assert_one_line_error(err, "missing.txt")


def test_cli_unknown_model(capsys, text_file, tmp_path):
    code, err = run_cli(["eval", "--model", str(tmp_path / "no-such-model"), "--text-file", str(text_file)], capsys)
    assert code == 2
    assert_one_line_error(err)


def test_cli_text_too_short(capsys, tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    code, err = run_cli(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--text-file",
            str(short),
            "--ranks",
            "8:8",
            "--method",
            "weights",
            "--context",
            "64",
            "--continuation",
            "32",
        ],
        capsys,
    )
    assert code == 2
    assert_one_line_error(err, "too short")


def test_cli_ranks_too_big_for_model(capsys, tiny_model_dir, text_file):
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--text-file",
        str(text_file),
        "--dtype",
        "float32",
        "--context",
        "64",
        "--continuation",
        "32",
        "--windows",
        "1",
        "--ranks",
        f"{HEAD_DIM + 1}:{HEAD_DIM}",
        "--method",
        "weights",
    ]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(err, "head_dim")


def test_cli_runs_on_a_local_model(capsys, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--text-file",
        str(text_file),
        "--dtype",
        "float32",
        "--context",
        "64",
        "--continuation",
        "32",
        "--windows",
        "2",
        "--ranks",
        f"{HEAD_DIM}:{HEAD_DIM},4:4",
        "--method",
        "weights",
        "--sinks",
        "0",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "eval.png"),
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [row["name"] for row in data["rows"]] == ["dynamic", f"svd-k{HEAD_DIM}-v{HEAD_DIM}", "svd-k4-v4"]
    assert data["dataset"] == "text.txt" and data["protocol"] == "continuation"
    assert (tmp_path / "eval.png").stat().st_size > 0


# --- the real default model, end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_on_default_model(tmp_path):
    out = tmp_path / "eval.json"
    # float32: in bfloat16 the latents are rounded to bf16 and the rebuilt K/V again, which alone moves ppl
    # by a few tenths of a percent even at full rank; float32 isolates the mechanism, which must be exact.
    assert (
        main(
            [
                "eval",
                "--windows",
                "1",
                "--context",
                "256",
                "--continuation",
                "128",
                "--ranks",
                "64:64",
                "--method",
                "weights",
                "--sinks",
                "0",
                "--dtype",
                "float32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert {"model", "dataset", "protocol", "rows"} <= set(data)
    assert all(set(row) == ROW_KEYS for row in data["rows"])
    base, full = data["rows"]
    assert (base["name"], full["name"]) == ("dynamic", "svd-k64-v64")
    assert 3 < base["ppl"] < 200
    assert full["ppl"] == pytest.approx(base["ppl"], rel=1e-3)  # head_dim is 64: full rank loses nothing
