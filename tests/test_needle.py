"""`hf-svdkv needle`: prompts built as described (key at its depth, filler from the text given), scoring, the JSON
schema, and bad flags refused before anything runs."""

from __future__ import annotations

import json
import random
from importlib.util import find_spec

import pytest
import torch
from test_oneliner import word_tokenizer
from tiny_models import tiny_model, weights_config
from transformers import DynamicCache

from hf_svdkv.tools.eval import dynamic_row, svd_row
from hf_svdkv.tools.needle import (
    KEY_SENTENCE,
    QUESTION,
    NeedleResult,
    _ids,
    default_trials,
    make_trial,
    plot,
    run_needle,
    run_trial,
    to_markdown,
)


class DigitTokenizer:
    """Characters as tokens (ids = code points below 96): a key is split over one token per digit."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 96 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) if i >= 32 else chr(i + 96) for i in ids)


def test_the_key_sentence_sits_at_its_depth_in_filler_from_the_text_given():
    tokenizer = word_tokenizer()
    filler = torch.arange(1, 95).repeat(20)  # token ids of "w0 w1 ...": recognisable, never a key sentence token
    for depth in (0.0, 0.3, 1.0):
        trial = make_trial(tokenizer, filler, 300, depth, random.Random(0))
        sentence = _ids(tokenizer, KEY_SENTENCE.format(key=trial.key))
        filler_len = 300 - len(sentence) - len(_ids(tokenizer, QUESTION))
        assert trial.document.numel() + trial.question.numel() == 300
        assert trial.key_at == round(depth * filler_len)
        assert torch.equal(trial.document[trial.key_at : trial.key_at + len(sentence)], sentence)
        rest = torch.cat([trial.document[: trial.key_at], trial.document[trial.key_at + len(sentence) :]])
        assert rest.numel() == filler_len and bool(torch.isin(rest, filler).all())
    assert len(trial.key) == 5 and trial.key.isdigit()
    with pytest.raises(ValueError, match="filler text has 10 tokens"):
        make_trial(tokenizer, filler[:10], 300, 0.5, random.Random(0))


def test_a_trial_passes_only_with_the_whole_key_in_the_answer():
    """A scripted model that answers the question with the key's digits, one token each (a key split over tokens):
    it passes, with a low NLL of the key; one that stops a digit short fails."""
    from hf_svdkv.tools.needle import Trial

    tokenizer = DigitTokenizer()
    key = "12345"
    trial = Trial(
        torch.tensor(_ids(tokenizer, "x" * 50)),
        torch.tensor(_ids(tokenizer, QUESTION)),
        key,
        torch.tensor(_ids(tokenizer, key)),
        25,
    )
    config = tiny_model("llama").config

    class Scripted(torch.nn.Module):
        """Next-token logits from the input token alone: the question's last character -> the key's first digit,
        each digit -> the next one, anything else -> 'x'."""

        def __init__(self, answer: str):
            super().__init__()
            self.config, self.device = config, torch.device("cpu")
            chain = [QUESTION[-1], *answer]
            self.next = {ord(a) % 96: ord(b) % 96 for a, b in zip(chain, chain[1:], strict=False)}

        def forward(self, ids, use_cache=True, logits_to_keep=0, **kwargs):
            ids = ids[:, -1:] if logits_to_keep == 1 else ids
            logits = torch.full((*ids.shape, 96), -10.0)
            for i, token in enumerate(ids[0].tolist()):
                logits[0, i, self.next.get(token, ord("x") % 96)] = 10.0
            return type("Out", (), {"logits": logits})()

    hit, nll = run_trial(Scripted(key), tokenizer, trial, DynamicCache())
    assert hit and nll < 1e-3
    hit, nll = run_trial(Scripted(key[:-1]), tokenizer, trial, DynamicCache())
    assert not hit and nll > 1


def test_run_needle_reports_every_row_and_cell(tmp_path):
    model = tiny_model("llama", num_layers=2)
    rows = [dynamic_row(), svd_row("svd-k8-v8", config=weights_config(key_rank=8, value_rank=8, window=8))]
    result = run_needle(
        model,
        word_tokenizer(),
        rows,
        torch.arange(1, 95).repeat(30),
        lengths=[64, 96],
        depths=[0.25, 0.75],
        trials=2,
        progress=False,
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"model", "rows", "settings"} and [r["name"] for r in data["rows"]] == ["dynamic", "svd-k8-v8"]
    for row in data["rows"]:
        assert set(row) == {"name", "accuracy", "key_nll", "kv_bytes_per_token", "compression_ratio", "cells"}
        assert [(c["length"], c["depth"], c["trials"]) for c in row["cells"]] == [
            (64, 0.25, 2),
            (64, 0.75, 2),
            (96, 0.25, 2),
            (96, 0.75, 2),
        ]
        assert all(set(c) == {"length", "depth", "hits", "trials", "key_nll"} for c in row["cells"])
    assert data["rows"][0]["compression_ratio"] == 1.0 and data["rows"][1]["compression_ratio"] > 1.0
    assert NeedleResult.from_dict(data).to_dict() == data  # a --json file redraws and re-tabulates
    assert "64 tokens" in to_markdown(result, "hf-svdkv needle") and plot(result, tmp_path / "n.png").stat().st_size > 0
    assert default_trials([1024, 2048, 3072], [0.1, 0.5, 0.9]) * 9 >= 101  # standard error under 5 points a row


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--depths", "0.5,1.5"], "--depths must lie in [0, 1]"),
        (["--lengths", "0"], "--lengths takes positive integers"),
        (["--trials", "0"], "--trials must be positive"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, args, fragment):
    from hf_svdkv.tools.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["needle", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0]


def test_lengths_past_the_models_positions_are_refused():
    model = tiny_model("llama", num_layers=1)  # 512 positions
    with pytest.raises(ValueError, match="beyond the model's 512 positions"):
        run_needle(
            model,
            word_tokenizer(),
            [dynamic_row()],
            torch.arange(1, 95).repeat(30),
            lengths=[600],
            depths=[0.5],
            trials=1,
            progress=False,
        )


@pytest.mark.skipif(find_spec("optimum") is None or find_spec("optimum.quanto") is None, reason="no optimum-quanto")
def test_peer_rows_run_on_any_length_and_the_key_pass_leaves_the_cache_alone():
    """quanto's quantized tensors cannot be deep-copied (the key's NLL runs on a copy of the cache), and KIVI's
    per-channel groups do not divide a 150-token document: both rows still run. The greedy answer after the key's
    pass is the one without it."""
    from hf_svdkv.tools.eval import PEERS, quantized_row
    from hf_svdkv.tools.kivi import kivi_cache
    from hf_svdkv.tools.needle import fork

    model = tiny_model("llama", num_layers=2)
    rows = [dynamic_row(), *(quantized_row("quanto", bits, name, **kw) for name, bits, kw in PEERS["quanto"][1:4])]
    result = run_needle(
        model,
        word_tokenizer(),
        rows,
        torch.arange(1, 95).repeat(30),
        lengths=[170],
        depths=[0.5],
        trials=1,
        progress=False,
    )
    assert [row.name for row in result.rows] == ["dynamic", "quantized-int2", "kivi-int4", "kivi-int2-g32"]
    assert all(row.compression_ratio > 1 for row in result.rows[1:])

    def filled():
        cache = kivi_cache(model.config, 2, **PEERS["quanto"][3][2])
        model(torch.arange(1, 151)[None] % 90, past_key_values=cache, use_cache=True)
        return cache

    with torch.inference_mode():
        cache = filled()
        copy = fork(cache)
        model(torch.arange(1, 41)[None] % 90, past_key_values=copy, use_cache=True)
        after = model(torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits
        expected = model(torch.tensor([[7]]), past_key_values=filled(), use_cache=True).logits
    assert copy.get_seq_length() == 190 and cache.get_seq_length() == 151
    assert cache.layers[0].keys.shape[-2] == 151 - 128 and copy.layers[0].keys.shape[-2] == 190 - 128
    assert torch.equal(after, expected)
