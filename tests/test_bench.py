"""`hf-svdkv bench` on a tiny random model (seconds), its table and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import VOCAB, tiny_model
from transformers import PreTrainedTokenizerFast

from hf_svdkv.growing import SPARE_FRACTION
from hf_svdkv.tools.bench import BenchResult, BenchRow, markdown_table, table_rows
from hf_svdkv.tools.cli import build_parser, main

ROW_KEYS = {"name", "context", "batch", "prefill_s", "decode_tokens_per_s", "peak_mem_bytes", "kv_bytes"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (2 KV heads of head_dim 32) plus a word-level tokenizer, loadable as a local model."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(
        models.WordLevel({"<unk>": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}, unk_token="<unk>")
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)
    return directory


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def _held_tokens(prefill: int, steps: int) -> int:
    """Tokens a growing cache tensor has room for after a prefill and `steps` single-token appends."""
    length = capacity = prefill
    for _ in range(steps):
        if length + 1 > capacity:
            capacity = length + 1 + length // SPARE_FRACTION
        length += 1
    return capacity


def test_bench_runs_on_a_tiny_model(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["hf-svdkv", "bench", "..."])  # the command line the markdown records
    paths = {
        flag: tmp_path / name for flag, name in (("--json", "b.json"), ("--plot", "b.png"), ("--markdown", "b.md"))
    }
    args = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--contexts",
        "40,72",
        "--batch",
        "1,2",
        "--ranks",
        "16:16",
        "--target-ratio",
        "3",
        "--method",
        "weights",
        "--sinks",
        "0",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeat",
        "2",
        "--peak",
        "inline",  # the fresh processes of the default are tested below, once
    ]
    assert main(args + [item for flag, path in paths.items() for item in (flag, str(path))]) == 0
    result = json.loads(paths["--json"].read_text())
    assert {"model", "device", "rows"} <= result.keys() and result["device"] == "cpu"
    rows = result["rows"]
    assert [r["name"] for r in rows[::4]] == ["dynamic", "svd-k16-v16", "svd-3x"]
    assert all(r.keys() == ROW_KEYS for r in rows) and len(rows) == 3 * 2 * 2
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in rows)
    by_key = {(r["name"], r["context"], r["batch"]): r for r in rows}
    for context in (40, 72):
        for batch in (1, 2):
            dynamic = by_key["dynamic", context, batch]["kv_bytes"]
            # float32 cache of 2 heads x 2 x 32 per token and layer vs 2 x (16 + 16) latents + one int32 position
            steps = 1 + 2  # warm-up and timed decode steps after the prefill
            assert dynamic == 2 * batch * (context + steps) * 2 * 2 * 32 * 4
            # ... held with the spare room decoding adds (growing.SPARE_FRACTION), which the byte count includes
            held = _held_tokens(context, steps)
            assert by_key["svd-k16-v16", context, batch]["kv_bytes"] == 2 * batch * held * (2 * (16 + 16) * 4 + 4)
    assert paths["--plot"].stat().st_size > 0
    markdown = paths["--markdown"].read_text()
    assert "| row | context | batch |" in markdown and "svd-3x" in markdown and "`hf-svdkv bench ...`" in markdown
    out = capsys.readouterr().out
    assert "decode ×dyn" in out and "(round 2/2)" in out and result["settings"]["repeat"] == 2


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the resident set is read from Linux's /proc")
def test_bench_measures_each_rows_peak_in_a_fresh_process(tiny_model_dir, tmp_path):
    out = tmp_path / "b.json"
    # 8,192 tokens: every cache tensor is over glibc's fixed mmap threshold (1 MiB), so each one is counted
    args = ["bench", "--model", str(tiny_model_dir), "--dtype", "float32", "--contexts", "8192", "--batch", "1"]
    args += ["--ranks", "16:16", "--method", "weights", "--sinks", "0", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--beyond-positions", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["peak"] == "isolated"
    rows = {r["name"]: r for r in result["rows"]}
    assert rows.keys() == {"dynamic", "svd-k16-v16"}
    for row in rows.values():  # the cache is live when the peak is read: it is part of it
        assert row["kv_bytes"] <= row["peak_mem_bytes"] < 20 * row["kv_bytes"]
    # the fresh process refuses a row, context or batch the run does not have
    parsed = build_parser().parse_args([*args, "--beyond-positions", "--peak-of", "svd-k16-v16@4096x1"])
    with pytest.raises(ValueError, match="--peak-of svd-k16-v16@4096x1: no such row"):
        parsed.func(parsed)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--contexts", "1k"], "--contexts"),
        (["--batch", "0"], "--batch"),
        (["--ranks", "32"], "bad --ranks entry"),
        (["--target-ratio", "0.5"], "target_ratio"),
        (["--ranks", "8:8", "--latent-bits", "3"], "latent_bits must be one of"),
        (["--steps", "0"], "--steps"),
        (["--repeat", "0"], "--repeat"),
        (["--json", "/no/such/dir/b.json"], "does not exist"),
    ],
)
def test_bench_bad_input_is_one_line_exit_2(capsys, args, fragment):
    code, err = run_cli(["bench", *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hf-svdkv: error: ") and fragment in lines[0], err


def test_bench_refuses_what_would_not_fit_before_allocating(capsys, tiny_model_dir):
    base = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "--contexts",
        "9000000",
        "--batch",
        "1",
        "--ranks",
        "16:16",
        "--method",
        "weights",
    ]
    code, err = run_cli(base, capsys)
    assert code == 2 and "a --contexts prompt = 9,000,000 tokens is beyond the model's 512 positions" in err
    code, err = run_cli([*base, "--beyond-positions"], capsys)
    assert code == 2 and "GiB available" in err and "context 9,000,000 x batch 1 needs about" in err


def test_bench_unknown_model_is_one_line(capsys, tmp_path):
    code, err = run_cli(["bench", "--model", str(tmp_path / "missing"), "--contexts", "16", "--batch", "1"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("hf-svdkv: error: cannot load model")


def test_table_ratios_are_to_dynamic():
    rows = [
        BenchRow("dynamic", 8192, 1, 2.0, 10.0, 400, 200),
        BenchRow("svd", 8192, 1, 2.5, 12.0, 200, 100),
        BenchRow("other", 1024, 1, 0.1, 50.0, None, 10),
    ]
    result = BenchResult("m", "cpu", rows, {"steps": 4})
    cells = table_rows(result)
    assert cells[0][5:] == ("1.00x", "0.0", "1.00x", "0.0", "1.00x")
    assert cells[1][5] == "1.20x" and cells[1][7] == "2.00x" and cells[1][9] == "2.00x"
    assert cells[2][5] == cells[2][7] == cells[2][9] == "-"  # no dynamic row at that context
    assert markdown_table(result, "hf-svdkv bench").count("\n| ") == 4
