"""Write decoder params back as an HF model folder (safetensors + config.json [+ tokenizer])
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

The command line is ``python -m qsharp_jax.export --src CONVERTED_DIR --out HF_DIR``.

Uses the same rules table as import (:mod:`qsharp_jax.models.weights`). Tensors are gathered to
host one at a time and written in shards of at most ``max_shard_bytes``, so a sharded
model is never gathered whole. Written to a temp dir and renamed, like ``convert``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from qsharp_jax.checkpoints.files import flat_by_path, staged_output, write_hf_metadata
from qsharp_jax.models import weights
from qsharp_jax.models.config import ModelConfig

_INDEX = "model.safetensors.index.json"


def _params_by_path(model_or_params) -> dict:
    state = nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module) else model_or_params
    return flat_by_path(state)


def export_hf(
    out: str | os.PathLike,
    model_or_params,
    config: ModelConfig,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
) -> str:
    """Write ``model_or_params`` (a Decoder or its nnx.Param State) as an HF folder ``out``.

    dtype: stored dtype (default: each parameter's own dtype). Returns ``out``.
    """
    from safetensors.numpy import save_file

    out = os.path.abspath(os.fspath(out))
    params = _params_by_path(model_or_params)
    with staged_output(out, overwrite) as tmp:
        shards, current, size = [], {}, 0

        def flush():
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"  # renamed once the count is known
                save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append((name, list(current)))
                current, size = {}, 0

        stored_dtype = None
        for e in weights.entries(config):
            if e.path not in params:
                raise weights.ConversionError(
                    f"parameter {e.path_str} is missing from the params to export "
                    f"(config {config.model_type}, {config.num_layers} layers)."
                )
            y = np.asarray(jax.device_get(params[e.path]))
            if dtype is not None:
                y = y.astype(np.dtype(dtype))
            stored_dtype = stored_dtype or y.dtype
            x = weights.to_hf(e, y)
            if size and size + x.nbytes > max_shard_bytes:
                flush()
            current[e.hf] = x
            size += x.nbytes
        flush()

        if len(shards) == 1:
            os.rename(os.path.join(tmp, shards[0][0]), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map, total = {}, 0
            for i, (name, keys) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(os.path.join(tmp, name), os.path.join(tmp, final))
                weight_map.update({k: final for k in keys})
            total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
            with open(os.path.join(tmp, _INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

        write_hf_metadata(tmp, config, np.dtype(stored_dtype).name, tokenizer)
    return out
