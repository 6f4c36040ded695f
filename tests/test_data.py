"""Corpus loading, tokenization and window slicing (slicing tests are synthetic and offline)."""

from __future__ import annotations

import pytest
import torch

from hf_svdkv import assets
from hf_svdkv.text import load_text, make_windows, split_calibration, tokenize_text

pytest_plugins = ["fixtures_real"]


def starts(windows: list[torch.Tensor]) -> list[int]:
    return [int(w[0]) for w in windows]  # ids are arange, so the first id is the offset


def test_windows_are_even_disjoint_and_span_the_range():
    ids = torch.arange(1000)
    windows = make_windows(ids, 100, 4)
    assert starts(windows) == [0, 300, 600, 900] and all(w.shape == (100,) for w in windows)
    assert all(torch.equal(w, torch.arange(s, s + 100)) for w, s in zip(windows, starts(windows), strict=True))
    assert starts(make_windows(ids, 100, 4)) == starts(windows)  # deterministic
    assert starts(make_windows(ids, 100, 10)) == list(range(0, 1000, 100))  # exact fit: back to back
    assert starts(make_windows(ids, 100, 1)) == [0]
    assert starts(make_windows(ids, 7, 3)) == [0, 496, 993]  # last window ends exactly at the end


def test_windows_respect_start_and_stop():
    ids = torch.arange(1000)
    windows = make_windows(ids, 50, 3, start=100, stop=400)
    assert starts(windows) == [100, 225, 350] and int(windows[-1][-1]) == 399
    assert starts(make_windows(ids, 50, 2, stop=-500)) == [0, 450]  # negative stop works like slicing


def test_windows_errors_and_shortfall():
    ids = torch.arange(250)
    with pytest.raises(ValueError, match="text too short: 250 tokens, need at least 300 for one window of 300"):
        make_windows(ids, 300, 1)
    with pytest.raises(ValueError, match="text too short: 50 tokens"):
        make_windows(ids, 100, 1, start=200)
    with pytest.warns(UserWarning, match="only 2 windows of 100 tokens fit in 250"):
        assert starts(make_windows(ids, 100, 5)) == [0, 150]
    with pytest.raises(ValueError, match="1-D"):
        make_windows(ids.view(5, 50), 10, 1)
    with pytest.raises(ValueError, match=">= 1"):
        make_windows(ids, 0, 1)


def test_calibration_split_is_disjoint_from_eval_windows():
    ids = torch.arange(10_000)
    calib, rest = split_calibration(ids, 2048)
    assert calib.numel() == 2048 and rest.numel() == 10_000 - 2048
    assert torch.equal(torch.cat([rest, calib]), ids)  # calibration is the end of the corpus
    taken = torch.cat(make_windows(rest, 1000, 5))
    assert not set(taken.tolist()) & set(calib.tolist())
    for bad in (0, 10_000, -1):
        with pytest.raises(ValueError, match="calib_tokens"):
            split_calibration(ids, bad)


def test_load_text_from_file_and_errors(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("héllo wörld\nline two\n", encoding="utf-8")
    assert load_text(text_file=str(good)) == "héllo wörld\nline two\n"
    with pytest.raises(FileNotFoundError, match="text file not found"):
        load_text(text_file=str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_text(text_file=str(tmp_path / "latin1.txt"))
    with pytest.raises(OSError, match="cannot read text file"):
        load_text(text_file=str(tmp_path))  # a directory
    with pytest.raises(ValueError, match="unknown dataset 'ptb'"):
        load_text("ptb")


def test_wikitext_offline_fails_fast_with_a_hint(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="not reachable.*--dataset wiki"):
        load_text("wikitext")


class _FakeTokenizer:
    vocab_size = 10

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert not add_special_tokens
        return {"input_ids": [int(c) for c in text.split()]}


def test_tokenize_text_rejects_ids_beyond_the_vocab():
    ids = tokenize_text(_FakeTokenizer(), "1 2 9")
    assert ids.dtype == torch.long and ids.tolist() == [1, 2, 9]
    with pytest.raises(ValueError, match=r"ids \[10, 12\] >= vocab size 10"):
        tokenize_text(_FakeTokenizer(), "1 12 10")
    assert tokenize_text(_FakeTokenizer(), "12", vocab_size=13).tolist() == [12]


def test_wiki_corpus_tokenizes_plainly(default_model, wiki_text):
    model, tokenizer = default_model
    ids = tokenize_text(tokenizer, wiki_text, vocab_size=model.config.vocab_size)
    assert ids.dim() == 1 and ids.numel() > 500_000
    assert int(ids[0]) != tokenizer.bos_token_id and int(ids.max()) < 49152  # no BOS, no added tokens
    assert tokenizer.decode(ids[:3]).startswith("Anarchism")
    calib, rest = split_calibration(ids, 4096)
    assert len(make_windows(rest, 2048, 3)) == 3
