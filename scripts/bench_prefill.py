#!/usr/bin/env python
"""Time to first token, dense against SeerAttention, with a breakdown. See `python scripts/bench_prefill.py --help`."""

from seerattn_hf.evaluation.cli import prefill_main

if __name__ == "__main__":
    prefill_main()
