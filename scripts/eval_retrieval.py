#!/usr/bin/env python
"""RULER-style needle retrieval, dense against sparse. See `python scripts/eval_retrieval.py --help`."""

from seerattn_hf.evaluation.cli import retrieval_main

if __name__ == "__main__":
    retrieval_main()
