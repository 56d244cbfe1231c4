"""Ahead-of-time lowering and compilation of the real programs from abstract inputs.

The three programs a Q# run executes on device, built exactly as the job builds them but
from ``ShapeDtypeStruct`` leaves carrying their shardings (no weights, no device memory):

* ``prefill``: :func:`qsharp_jax.rollout.engine.prefill` of the reference and the guide's
  backbone for ``prompts`` left-padded prompts, caches grown to ``samples`` rows per prompt;
* ``decode``: :func:`qsharp_jax.rollout.engine.decode`, the whole guided ``while_loop`` with
  its donated caches (a V-type guide scores ``k`` candidates per step);
* ``train_step``: the guidance learner's AdamW step
  (:func:`qsharp_jax.guidance.train_step.make_train_step`) on one batch of the longest bucket.

``compile_programs`` compiles them for any mesh: on a CPU host, a mesh over the TPU devices
that :meth:`Topology.devices` describes gives XLA's TPU memory and cost analyses, the numbers
a pod run will meet (the MaxText ``train_compile`` idea).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsharp_jax.core import optim
from qsharp_jax.core.sharding import (
    DEFAULT_RULES,
    check_model_fits,
    logical_to_spec,
    make_mesh,
    named_sharding,
    state_shardings,
)
from qsharp_jax.guidance import train_step as ts
from qsharp_jax.guidance.model import GuidanceModel, HeadConfig, build as build_head
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.models.decoder import Decoder, cache_logical_axes, init_cache
from qsharp_jax.rollout import engine
from qsharp_jax.rollout.state import LoopSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PROGRAMS = ("prefill", "decode", "train_step")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Everything that fixes the programs' shapes (one Q# run's sizes)."""

    reference: ModelConfig
    guide: ModelConfig
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    reference_dtype: str = "bfloat16"  # compute and storage dtype of the frozen reference
    guide_compute_dtype: str = "bfloat16"
    guide_param_dtype: str = "float32"  # the learner's master weights, also sampled from
    prompts: int = 8  # prompts per generate call (already padded to the batch shards)
    samples: int = 16  # rows per prompt
    prompt_length: int = 256  # bucketed prompt length
    max_new_tokens: int = 1024
    k: int = 20
    guidance: str = "qsharp"
    learner_batch: int = 32
    learner_length: int = 2048  # the longest bucket
    remat: bool = False
    loss_type: str = "bce"

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def cache_length(self) -> int:
        return self.prompt_length - 1 + self.max_new_tokens


def _abstract_on(tree, shardings):
    """ShapeDtypeStructs (with shardings) shaped like ``tree``; nnx Variables keep their wrapper."""

    def one(sharding, leaf):
        if isinstance(leaf, nnx.Variable):
            v = leaf.get_value()
            return leaf.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def abstract_reference(w: Workload, mesh: Mesh, rules: Iterable = DEFAULT_RULES):
    """(graphdef, sharded abstract params) of the reference decoder."""
    dt = DTYPES[w.reference_dtype]
    model = nnx.eval_shape(lambda: Decoder(w.reference, dtype=dt, param_dtype=dt, rules=rules, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, _abstract_on(state, state_shardings(state, mesh, rules))


def abstract_guide(w: Workload, mesh: Mesh, rules: Iterable = DEFAULT_RULES):
    """(graphdef, sharded abstract params) of the guidance model (backbone + head)."""

    def make() -> GuidanceModel:
        backbone = Decoder(
            w.guide,
            dtype=DTYPES[w.guide_compute_dtype],
            param_dtype=DTYPES[w.guide_param_dtype],
            rules=rules,
            remat=w.remat,
            rngs=nnx.Rngs(0),
        )
        return build_head(backbone, w.head, seed=0)

    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, _abstract_on(state, state_shardings(state, mesh, rules))


def _batch_struct(mesh: Mesh, shape, dtype, rules) -> jax.ShapeDtypeStruct:
    spec = logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _replicated(mesh: Mesh, x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=NamedSharding(mesh, P()))


def check_workload(w: Workload, sample_mesh: Mesh, learn_mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> None:
    """The same early divisibility checks the job runs (heads vs tensor, rows vs data x fsdp)."""
    check_model_fits(w.reference, sample_mesh, rules, batch=w.prompts, name="reference (prompts per batch)")
    check_model_fits(w.guide, sample_mesh, rules, batch=w.rows, name="guide in the decode loop")
    check_model_fits(w.guide, learn_mesh, rules, batch=w.learner_batch, name="guidance learner")


def lower_prefill(w: Workload, mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> jax.stages.Lowered:
    ref_graph, ref_state = abstract_reference(w, mesh, rules)
    guide_graph, guide_state = abstract_guide(w, mesh, rules)
    tokens = _batch_struct(mesh, (w.prompts, w.prompt_length), jnp.int32, rules)
    mask = _batch_struct(mesh, (w.prompts, w.prompt_length), jnp.bool_, rules)
    with jax.set_mesh(mesh):
        return engine.prefill_jit.lower(
            ref_graph, guide_graph, w.samples, w.max_new_tokens, ref_state, guide_state, tokens, mask
        )


def cache_structs(w: Workload, mesh: Mesh, rules: Iterable = DEFAULT_RULES):
    """(reference, guide) KV caches as prefill hands them to decode: ``rows`` x ``cache_length``,
    sharded by the cache's logical axes (prefill constrains its outputs to exactly these)."""

    def one(cfg: ModelConfig, dtype):
        abstract = jax.eval_shape(lambda: init_cache(cfg, w.rows, w.cache_length, dtype))
        axes = cache_logical_axes(abstract)
        return jax.tree.map(
            lambda a, names: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=named_sharding(mesh, names, rules, shape=a.shape, what="KV cache")
            ),
            abstract,
            axes,
            is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(s, str) for s in x),
        )

    return one(w.reference, DTYPES[w.reference_dtype]), one(w.guide, DTYPES[w.guide_compute_dtype])


def lower_decode(w: Workload, mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> jax.stages.Lowered:
    """The guided decode loop over the caches prefill produced."""
    ref_graph, ref_state = abstract_reference(w, mesh, rules)
    guide_graph, guide_state = abstract_guide(w, mesh, rules)
    ref_cache, guide_cache = cache_structs(w, mesh, rules)
    n = w.rows
    spec = LoopSpec(w.max_new_tokens, w.k, w.guidance, True)
    keys = _batch_struct(mesh, (n, 2), jnp.uint32, rules)  # raw per-row PRNG keys
    knobs = {
        name: _replicated(mesh, v)
        for name, v in dict(
            temperature=np.float32(1), top_p=np.float32(1), top_k=np.int32(0), greedy=np.bool_(0), inv_eta=np.float32(1)
        ).items()
    }
    with jax.set_mesh(mesh):
        return engine.decode_jit.lower(
            ref_graph,
            guide_graph,
            spec,
            ref_state,
            guide_state,
            ref_cache,
            guide_cache,
            _batch_struct(mesh, (n,), jnp.int32, rules),
            _batch_struct(mesh, (n,), jnp.int32, rules),
            keys,
            knobs,
            _replicated(mesh, np.zeros((4,), np.int32)),
            _replicated(mesh, np.int32(0)),
        )


def _unshard(tree):
    """Plain ShapeDtypeStructs (for eval_shape outside a mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lower_train_step(w: Workload, mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> jax.stages.Lowered:
    graphdef, params = abstract_guide(w, mesh, rules)
    schedule = optax.constant_schedule(2e-5)
    tx = optim.make_optimizer(schedule, weight_decay=0.01, clip=5.0)
    step_fn = ts.make_train_step(graphdef, tx, schedule, w.head, loss_type=w.loss_type)
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(lambda p: optim.init_train_state(p, tx, 0), _unshard(params))
        state_sharding = optim.train_state_shardings(abstract, mesh, rules)
        batch_sharding = ts.batch_shardings(mesh, w.learner_batch, rules)
        state = _abstract_on(abstract, state_sharding)
        b, t = w.learner_batch, w.learner_length
        shapes = dict(
            tokens=((b, t), jnp.int32),
            token_mask=((b, t), jnp.bool_),
            loss_mask=((b, t), jnp.bool_),
            reward=((b,), jnp.float32),
            weight=((b,), jnp.float32),
        )
        batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding[k]) for k, (s, d) in shapes.items()}
        train = optim.jit_train_step(step_fn, state_sharding, batch_sharding, mesh)
        return train.lower(state, batch)


@dataclasses.dataclass
class CompiledProgram:
    """What XLA says about one compiled program, per device."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int  # XLA's scratch: activations, gathered weights, loop temporaries
    code_bytes: int
    flops: float  # per device; a while loop's body counted once
    bytes_accessed: float
    compile_seconds: float
    error: str = ""  # XLA's own message when the program does not fit / fails to compile

    @property
    def peak_bytes(self) -> int:
        """Live bytes at the program's peak: arguments + outputs not aliased to them + scratch."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def compile_lowered(name: str, lowered: jax.stages.Lowered) -> CompiledProgram:
    t = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA raises on an HBM overflow at compile time on TPU
        msg = str(e).strip().splitlines()[0][:400]
        # "... memory required for HLO temporaries (50.57G) exceeds available HBM (15.75G)": keep the need
        need = re.search(r"required for HLO temporaries \(([0-9.]+)([KMG])\)", msg)
        temp = int(float(need.group(1)) * 1024 ** "KMG".index(need.group(2)) * 1024) if need else 0
        return CompiledProgram(name, 0, 0, 0, temp, 0, float("nan"), float("nan"), time.perf_counter() - t, msg)
    seconds = time.perf_counter() - t
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return CompiledProgram(
        name=name,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops=float(cost.get("flops", float("nan"))),
        bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
        compile_seconds=seconds,
    )


def compile_programs(
    w: Workload,
    sample_mesh: Mesh,
    learn_mesh: Mesh,
    rules: Iterable = DEFAULT_RULES,
    programs: Iterable[str] = PROGRAMS,
) -> dict[str, CompiledProgram]:
    """Compile the named programs (prefill and decode on ``sample_mesh``, the train step on
    ``learn_mesh``) and read XLA's memory and cost analyses."""
    rules = tuple(rules)
    check_workload(w, sample_mesh, learn_mesh, rules)
    out = {}
    for name in programs:
        if name == "prefill":
            out[name] = compile_lowered(name, lower_prefill(w, sample_mesh, rules))
        elif name == "decode":
            out[name] = compile_lowered(name, lower_decode(w, sample_mesh, rules))
        elif name == "train_step":
            out[name] = compile_lowered(name, lower_train_step(w, learn_mesh, rules))
        else:
            raise ValueError(f"unknown program {name!r}; choose from {PROGRAMS}.")
    return out


def meshes_for(devices, sample: tuple[int, int, int], learn: tuple[int, int, int]) -> tuple[Mesh, Mesh]:
    return make_mesh(*sample, devices=devices), make_mesh(*learn, devices=devices)
