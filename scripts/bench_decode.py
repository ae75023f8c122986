#!/usr/bin/env python
"""Decoding speed of a model, dense against sparse decoding. See `python scripts/bench_decode.py --help`
(the decode attention kernel alone: scripts/bench_decode_attention.py)."""

from seerattn_hf.evaluation.decoding import decode_main

if __name__ == "__main__":
    decode_main()
