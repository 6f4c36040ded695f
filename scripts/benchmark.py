"""Prefill time, decode speed, peak memory and KV bytes of compressed caches vs the dynamic cache: same flags as
`hf-svdkv bench`, e.g. `python scripts/benchmark.py --contexts 8192 --ranks 32:32 --peers --json bench.json`."""

import sys

from hf_svdkv.tools.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
