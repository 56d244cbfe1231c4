"""Import HF (safetensors) and GGUF checkpoints: source readers, tensor-by-tensor streaming
onto the target shardings, and the Orbax writer behind ``python -m qsharp_jax.convert``.

Weights stream one tensor at a time: read (safetensors ``safe_open`` or a memory-mapped
GGUF), re-layout with the rules of :mod:`qsharp_jax.models.weights`, cast, and
``device_put`` straight onto the parameter's target sharding, starting from the abstract
(memory-free) model. The output is written to a sibling temp dir and renamed into place
(:func:`qsharp_jax.checkpoints.files.staged_output`), so an error never leaves a
half-written directory behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax.checkpoints.files import (
    FORMAT,
    PARAMS_DIR,
    QSHARP_CONFIG,
    check_out,
    flat_by_path,
    folder_tokenizer,
    key_path,
    resolve_path,
    staged_output,
    write_hf_metadata,
)
from qsharp_jax.checkpoints.gguf import GGUFCheckpoint
from qsharp_jax.core.sharding import DEFAULT_RULES, check_model_fits, make_mesh, state_shardings
from qsharp_jax.models import decoder as model_lib, weights
from qsharp_jax.models.config import ModelConfig, from_hf_dict
from qsharp_jax.models.weights import ConversionError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SAFETENSORS_INDEX = "model.safetensors.index.json"


# ---- sources


class HFCheckpoint:
    """An HF model folder: config.json + one or several (indexed) safetensors files."""

    def __init__(self, folder: str | os.PathLike):
        self.path = os.fspath(folder)
        self._handles: dict = {}
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"no config.json in {self.path}: pass an HF model folder (config.json + *.safetensors) or a .gguf file."
            )
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
                    f"no *.safetensors in {self.path}: re-save the model with save_pretrained(safe_serialization=True)."
                )
            self._file_of = {}
            for name in files:
                for key in self._handle(name).keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    self._file_of[key] = name

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise FileNotFoundError(
                    f"{full} is listed in {_SAFETENSORS_INDEX} but missing: the download is incomplete."
                )
            self._handles[file] = safe_open(full, framework="numpy")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> np.ndarray:
        return self._handle(self._file_of[name]).get_tensor(name)

    def tokenizer(self):
        return folder_tokenizer(self.path)


def open_source(path: str | os.PathLike):
    """An HFCheckpoint or GGUFCheckpoint for ``path`` (errors name the problem and the fix)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"source {p} does not exist: pass an HF model folder or a .gguf file.")
    if os.path.isfile(p):
        if not p.endswith(".gguf"):
            raise ConversionError(f"{p} is a file but not a .gguf; pass a .gguf file or an HF model folder.")
        return GGUFCheckpoint(p)
    return HFCheckpoint(p)


# ---- streaming


def abstract_params(cfg: ModelConfig, *, dtype, param_dtype, rules):
    """(graphdef, abstract nnx.Param State) of the decoder: shapes only, no memory."""
    return nnx.split(model_lib.abstract(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules))


def stream_params(
    src,
    cfg: ModelConfig,
    mesh,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rules: Iterable = DEFAULT_RULES,
    log=None,
):
    """Fill the decoder tensor by tensor from ``src``; each lands directly on its sharding.

    Returns (graphdef, params State). Checks every needed tensor exists and has the right
    shape before reading any of them.
    """
    rules = tuple(rules)
    check_model_fits(cfg, mesh, rules)
    graphdef, abstract = abstract_params(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules)
    shapes = flat_by_path(abstract)
    shardings = flat_by_path(state_shardings(abstract, mesh, rules))
    plan = list(weights.entries(cfg))
    available = set(src.names())
    missing = [e.hf for e in plan if e.hf not in available]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (
            f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        )
        raise ConversionError(
            f"missing tensor {shown} in {src.path}: the checkpoint is incomplete or does not match its config "
            f"(model_type={cfg.model_type}, num_hidden_layers={cfg.num_layers}, tie_word_embeddings="
            f"{cfg.tie_word_embeddings}); re-download / re-export it or fix the config."
        )
    for e in plan:
        weights.check_shape(e, src.shape(e.hf), shapes[e.path].shape)
    covered = {e.path for e in plan}
    if covered != set(shapes):  # a decoder parameter with no rule: a bug in weights.RULES
        raise AssertionError(f"weights.RULES does not cover {sorted(set(shapes) - covered)}")
    used = {e.hf for e in plan}
    unused = [
        n
        for n in available - used
        if not weights.is_ignored(n) and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if unused and log:
        log(f"warning: {len(unused)} tensors in {src.path} are not used, e.g. {sorted(unused)[:3]}")

    np_dtype = np.dtype(param_dtype)
    values = {}
    for e in plan:
        y = weights.to_ours(e, src.tensor(e.hf), shapes[e.path].shape).astype(np_dtype, copy=False)
        values[e.path] = jax.device_put(y, shardings[e.path])
        del y  # host copy goes now; only the device array stays

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    filled = [values[tuple(k for k in key_path(p) if k != "value")] for p, _ in leaves]
    return graphdef, jax.tree.unflatten(treedef, filled)


def restore_target(abstract, shardings) -> object:
    """The abstract State with each leaf's sharding attached (an Orbax restore target)."""
    by_path = flat_by_path(shardings)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=by_path[tuple(k for k in key_path(p) if k != "value")])
            for p, a in leaves
        ],
    )


# ---- writing


def write_checkpoint(
    out: str, cfg: ModelConfig, params, *, param_dtype, tokenizer=None, source: str = "", overwrite: bool = False
) -> None:
    """Write params (Orbax), configs and tokenizer to ``out`` atomically."""
    import orbax.checkpoint as ocp

    out = os.path.abspath(os.fspath(out))
    with staged_output(out, overwrite) as tmp:
        # Synchronous save: nothing to overlap with here, and async would first copy every
        # param to a host buffer (+~30% peak RSS on a CPU host).
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(params))
        ckptr.close()
        meta = {
            "format": FORMAT,
            "param_dtype": np.dtype(param_dtype).name,
            "source": source,
            "model_config": cfg.to_json_dict(),
        }
        with open(os.path.join(tmp, QSHARP_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
        write_hf_metadata(tmp, cfg, np.dtype(param_dtype).name, tokenizer)


@dataclasses.dataclass
class Summary:
    architecture: str
    num_params: int
    dtype: str
    seconds: float
    out: str

    def line(self) -> str:
        return (
            f"converted {self.architecture}: {self.num_params:,} params, {self.dtype}, "
            f"{self.seconds:.1f} s -> {self.out}"
        )


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


def convert(
    src: str, out: str, *, dtype: str = "float32", mesh=None, rules=DEFAULT_RULES, overwrite: bool = False, log=print
) -> Summary:
    """Convert ``src`` (HF folder or .gguf) into an Orbax checkpoint dir ``out``."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    out = os.path.abspath(os.fspath(out))
    check_out(out, overwrite)  # fail before the slow part
    param_dtype = DTYPES[dtype]
    src = resolve_path(src)  # "smollm2" -> the reference GGUF
    source = open_source(src)
    mesh = parse_mesh(mesh) if mesh is None or isinstance(mesh, str) else mesh
    cfg = source.config
    _, params = stream_params(
        source, cfg, mesh, param_dtype=param_dtype, rules=rules, log=lambda m: print(m, file=sys.stderr)
    )
    tokenizer = source.tokenizer()
    write_checkpoint(
        out,
        cfg,
        params,
        param_dtype=param_dtype,
        tokenizer=tokenizer,
        source=os.path.abspath(os.fspath(src)),
        overwrite=overwrite,
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    summary = Summary(cfg.model_type, n, dtype, time.perf_counter() - t0, out)
    if log:
        log(summary.line())
    return summary
