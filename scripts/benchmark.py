"""Prefill time, decode speed, peak memory and KV bytes of compressed caches vs the dynamic cache.

Same flags as `hf-svdkv bench`, e.g.
    python scripts/benchmark.py --contexts 8192 --ranks 32:32 --group-size 3 --peers --json bench.json
"""

import argparse
import sys

from hf_svdkv.bench import add_bench_arguments, run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    sys.exit(run_bench(parser.parse_args(), command="python scripts/benchmark.py " + " ".join(sys.argv[1:])))
