"""Rewrite an AF3 checkpoint folder in another of the three layouts (see weights/layouts.py).

    python tools/convert_layout.py SOURCE DESTINATION --layout nvidia [--max-shard-size 5GB]

SOURCE may be in any layout (usually the hub layout, as transformers' save_pretrained writes it). Tensors
keep their bytes and dtype; names and files change, and the other files (config, tokenizer, chat template)
are copied into DESTINATION. Used to make test checkpoints in the transformers5 and nvidia layouts.
"""

import argparse
import sys
from pathlib import Path

from minaf3.weights.layouts import LAYOUTS, write_layout

from minaf3.errors import Minaf3Error

# Decimal units, as transformers' max_shard_size uses them ("5GB" = 5 * 10**9 bytes).
UNITS = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}


def parse_size(text: str) -> int:
    """'5GB', '300KB' or a plain number of bytes -> bytes."""
    text = text.strip().upper()
    for unit, scale in UNITS.items():
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(text[: -len(unit)]) * scale
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 300KB or 1000000")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="checkpoint folder to read")
    parser.add_argument("destination", type=Path, help="new folder to write (must be empty or absent)")
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=None, help="split each folder's weights (e.g. 5GB)"
    )
    args = parser.parse_args(argv)
    try:
        path = write_layout(args.source, args.destination, args.layout, args.max_shard_size)
    except Minaf3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.layout} layout to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
