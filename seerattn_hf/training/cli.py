"""`seerattn-train` / `scripts/train_gates.py`: train SeerAttention gates from a YAML config plus overrides.

    accelerate launch [--config_file configs/accelerate/single_gpu.yaml] scripts/train_gates.py \
        --config configs/smollm2-135m.yaml [--max_steps 100 ...]
"""

from __future__ import annotations

import logging
import sys

from .arguments import parse_arguments


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line) and train; returns the run summary.

    Argument errors exit with a one-line message naming the flag, what it expects and what it got.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        arguments = parse_arguments(argv)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"seerattn-train: error: {error}") from None
    from .trainer import train

    return train(arguments)


def main(argv: list[str] | None = None) -> None:
    """The console script: like `run`, with exit status 0 on success."""
    run(argv)


if __name__ == "__main__":
    main()
