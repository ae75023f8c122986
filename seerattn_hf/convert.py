"""`seerattn-convert SRC DST`: the gates the SeerAttention authors published (a folder or a Hub id
such as SeerAttention/SeerAttention-Llama-3.1-8B-AttnGates) written as a seerattn_hf adapter folder:
safetensors instead of a pickle, the same tensors, loadable with `seerattn_hf.from_pretrained(DST)`
and pushable to the Hub as it is."""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seerattn-convert", description=__doc__)
    parser.add_argument("source", help="folder or Hub id holding config.json and attn_gate_weights.pth")
    parser.add_argument("destination", help="folder to write seer_config.json, seer_gates.safetensors and README.md to")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE")
    parser.add_argument("--local_files_only", action="store_true", help="use the Hub cache only, no download")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .adapter import convert_published_gates

    try:
        folder = convert_published_gates(args.source, args.destination, revision=args.revision,
                                         local_files_only=args.local_files_only)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"seerattn-convert: error: {error}") from None
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
