"""The package's shape: no import cycles among its modules (every import statement counted, those inside functions
too), the library never importing its tools or the older API, and the older import paths still answering."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_svdkv"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules its import statements name (a package's submodule when `from pkg import name`
    names one, else the package itself)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_does_not_import_its_tools_or_the_older_api():
    graph = import_graph()
    library = [m for m in graph if not m.startswith(("hf_svdkv.tools", "hf_svdkv.compat")) and m != "hf_svdkv"]
    shims = {
        "hf_svdkv.config",
        "hf_svdkv.model",
        "hf_svdkv.utils",
        "hf_svdkv.inference",
        "hf_svdkv.interfaces",
        "hf_svdkv.compression",
        "hf_svdkv.cache",
        "hf_svdkv.data",
        "hf_svdkv.loading",
    }
    for module in library:
        if module in shims:
            continue
        wrong = {t for t in graph[module] if t.startswith(("hf_svdkv.tools", "hf_svdkv.compat")) or t in shims}
        assert not wrong, f"{module} imports {sorted(wrong)}"


@pytest.mark.parametrize(
    "path,names",
    [
        ("hf_svdkv", ["CompressionConfig", "patch_model", "SVDCompressedCache", "LLaMAKVCache", "ModelConfig"]),
        ("hf_svdkv.config", ["CompressionConfig", "ModelConfig", "InferenceConfig"]),
        ("hf_svdkv.model", ["LLaMAModelLoader", "ModelConfigWrapper", "LLaMA3Loader"]),
        ("hf_svdkv.compression", ["LLaMACompressionProfileBuilder", "SVDCompressionAlgorithm"]),
        ("hf_svdkv.cache", ["LLaMAKVCache", "StandardKVCache", "SVDCompressedCache"]),
        ("hf_svdkv.inference", ["LLaMACompressionInference", "CompressedAutoregressiveDecoder", "LLaMAFullForward"]),
        ("hf_svdkv.data", ["LLaMADatasetProcessor", "load_text", "tokenize_text"]),
        ("hf_svdkv.utils", ["MemoryManager"]),
        ("hf_svdkv.interfaces", ["CompressionInterface", "ModelLoaderInterface"]),
        ("hf_svdkv.loading", ["ModelConfig", "load_model"]),
    ],
)
def test_older_import_paths_answer(path, names):
    module = importlib.import_module(path)
    for name in names:
        assert getattr(module, name) is not None, f"{path}.{name}"
