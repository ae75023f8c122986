#!/usr/bin/env python
"""Long-document perplexity against block density. See `python scripts/eval_ppl.py --help`."""

from seerattn_hf.evaluation.cli import ppl_main

if __name__ == "__main__":
    ppl_main()
