from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("hf_svdkv/version.py").read_text(), version)

setup(
    name="hf_svdkv",
    version=version["__version__"],
    description="Low-rank (SVD) KV-cache compression for Hugging Face transformers",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["hf_svdkv", "hf_svdkv.*"]),
    package_data={"hf_svdkv": ["decode/cpu_decode.cpp"]},  # compiled on first use (hf_svdkv/decode/cpu.py)
    python_requires=">=3.10",
    install_requires=[
        # torch is not pinned here: install the build you want first (a bare requirement pulls a CUDA build).
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "filelock",
        "tqdm",
        "rich",
        # The default calibration text is a Wikipedia excerpt whose markup this strips (hf_svdkv.assets).
        "mwparserfromhell",
    ],
    extras_require={
        "eval": [
            "gguf>=0.10",
            "datasets",
            "matplotlib",
            "optimum-quanto",
            "hqq",
        ],
        "test": ["pytest", "ruff", "nbclient", "nbformat", "ipykernel"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["hf-svdkv=hf_svdkv.tools.cli:main"]},
)
