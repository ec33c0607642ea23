"""Strength benchmark of the DeepConfuse configuration (issue 3): same as `poison bench`.

Usage (from the repository root):
    python benchmarks/strength.py [--untargeted JSON] [--label-specific JSON] [--only JOB ...] [--split val]

Trains the generator(s) with the pipeline's own stages, materializes the uint8 shards,
trains every downstream classifier from scratch on them (recipes A and B20 x seeds) and
tests on the clean split; writes benchmarks/results/strength.json and the generated block
of BENCHMARKS.md. See poison/bench.py for the protocol and the jobs.
"""

import sys

from poison.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
