#!/usr/bin/env python
"""Sparse decoding quality before trained decode gates. See `python scripts/eval_decode_quality.py --help`."""

from seerattn_hf.evaluation.decoding import quality_main

if __name__ == "__main__":
    quality_main()
