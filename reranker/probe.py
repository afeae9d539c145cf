"""Kept so `python -m reranker.probe` (existing HEALTHCHECKs and exec probes) goes on working;
the probe lives in reranker.serving.probe."""

from __future__ import annotations

import sys

from reranker.serving.probe import main

if __name__ == "__main__":
    sys.exit(main())
