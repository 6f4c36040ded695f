"""notebooks/quickstart.ipynb runs from top to bottom on the default model, in a fresh kernel."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # One thread per kernel: on a small shared CPU, spinning BLAS / OpenMP threads slow everything down.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("MODEL", "DEVICE", "DTYPE", "ATTN"):
        monkeypatch.delenv(f"HF_SVDKV_{name}", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    text = outputs_text(notebook)
    assert "LlamaForCausalLM: 30 layers, 3 KV heads of dim 64, torch.bfloat16" in text
    full, compressed = (re.search(f"{name}: (.*)", text).group(1) for name in ("full cache", "compressed"))
    assert len(compressed.split()) >= 8 and compressed.split()[:3] == full.split()[:3]  # words, starting alike
    per_token, full_bytes = map(
        int, re.search(r"SVDCompressedCache: (\d+) bytes per token .* a full cache (\d+)", text).groups()
    )
    assert full_bytes == 23040 and per_token < full_bytes / 1.5
    for row in ("dynamic", "calib-4x-w32-mixed", "calib-6x-w32-mixed", "calib-2x-w128", "svd-2x-w128"):
        assert row in text
    assert (tmp_path / "quickstart_tradeoff.png").stat().st_size > 10_000
    assert any(o.get("data", {}).get("image/png") for c in notebook.cells for o in c.get("outputs", []))
