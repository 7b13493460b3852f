"""Benchmark script: same as `python -m fused_nll bench` (see --help)."""
import sys

from fused_nll._bench import main

if __name__ == "__main__":
    sys.exit(main())
