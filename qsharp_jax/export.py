"""Write a converted (or any loadable) model back as an HF folder.

    python -m qsharp_jax.export --src CONVERTED_DIR --out HF_DIR [--dtype bfloat16]

The library side is :mod:`qsharp_jax.checkpoints.export`.
"""

from __future__ import annotations

import argparse
import os
import sys

from qsharp_jax.checkpoints.export import export_hf
from qsharp_jax.checkpoints.loader import load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsharp_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--src", required=True, help="converted checkpoint dir (or anything qsharp_jax.checkpoints.loader.load takes)"
    )
    ap.add_argument("--out", required=True, help="HF folder to write")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="stored dtype (default: as loaded)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        lm = load(args.src, param_dtype=None)
        export_hf(args.out, lm.model, lm.config, tokenizer=lm.tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {lm.config.model_type} -> {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
