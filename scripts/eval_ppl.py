"""Perplexity of compressed KV caches vs the dynamic cache: same flags as `hf-svdkv eval`."""

import sys

from hf_svdkv.tools.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
