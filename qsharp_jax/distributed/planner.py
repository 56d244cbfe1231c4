"""Memory and step-time plan of a Q# run on a TPU topology: analytic, and compiled when libtpu is here.

Per device, for the three programs of :mod:`qsharp_jax.distributed.aot`:

Analytic model (no compiler, milliseconds; what the job checks before loading anything)
-------------------------------------------------------------------------------------
* **Weights**: every parameter's shard, from its logical axes and the rules table (exact:
  the same arithmetic the shardings use). Reference in ``reference_dtype``; the guide in its
  ``param_dtype`` (the learner's float32 master weights are what the sampler reads).
* **KV caches**: ``2 x layers x rows x kv_heads x (prompt_length - 1 + max_new_tokens) x
  head_dim x itemsize`` per model, split over the ``batch`` and ``kv_heads`` mesh axes, plus the
  slot mask and the write index. Prefill outputs them; decode carries them (donated, updated in place).
* **Optimizer state**: AdamW's two float32 moments mirror the guide's params, and the
  gradients (float32, one more copy) are live during the update.
* **Activations** (what XLA calls temporaries), per device with ``b`` local rows:

  - train step without remat: for each layer, the residuals JAX keeps for the backward pass:
    the softmax output (float32) and its ``compute_dtype`` copy over ``heads/tensor x T x T``
    per row, plus ``c_tok`` bytes per token (q/k/v before and after RoPE, the MLP's gate, up and
    product, the norms' float32 inputs: ``4 (q+2kv) D + 4 x 2 M + 3 x 4 E`` here);
    with ``remat`` only each block's input (``E x dtype``) is kept and one layer's residuals
    are rebuilt at a time. The peak comes in the backward pass of a layer, which adds that
    layer's float32 gradients of the attention probabilities and scores (8 bytes per score).
    Gradients of the weights are counted under optimizer state.
  - prefill: one layer's attention scores (float32 scores and probabilities plus the
    compute-dtype copy: 10 bytes per score) and MLP intermediates at a time, plus the
    prompt-sized caches before they are grown to ``rows`` x ``cache_length``.
  - decode step: the reference's next-token tensors over the vocabulary (logits, the
    reference and policy log-probabilities, top-p's sorted copy and cumulative sum: 6 float32
    ``[b, V]`` buffers), the ``[b, max_new_tokens]`` outputs the loop writes, the guide's params
    cast to its compute dtype once, and one more copy of both KV caches: XLA's TPU layout
    assignment gives the loop-carried caches another layout than the arguments and copies
    them once when the loop ends (seen in the compiled HLO as a ``copy`` of every cache layer
    after the ``while``).

Compiled (XLA's ``memory_analysis()`` of the program compiled for the topology)
-------------------------------------------------------------------------------
Arguments, outputs not aliased to donated arguments, temporaries and generated code, per
device; the components are the arguments' shard sizes (weights, caches, optimizer state)
and XLA's temporary size (activations). TPU layouts pad minor dimensions to tiles of
(8, 128), so small models read larger than the analytic count; at 1B-8B the two agree on
weights and caches to well under 1%.

Accuracy: weights, caches and optimizer state agree with XLA's shards to the byte (TPU tile
padding aside); peaks agree within a factor of 1.5 either way (compiled/analytic measured
0.74-1.24 over a tiny model and Llama-3-8B + 3.2-1B; ``tests/distributed/test_aot.py``).

Roofline step time
------------------
``max(FLOPs / peak, bytes / HBM bandwidth)`` per device with the chip numbers of
:mod:`qsharp_jax.distributed.topologies`. Analytic FLOPs: ``2 x (weights touched) per
token`` plus attention (``4 x heads x head_dim x keys`` per query), x3 for a train step (x4
with remat); analytic bytes: every weight and cache shard read once per decode step, params
and moments read and written once per train step. The compiled column uses XLA's
``cost_analysis()`` (a ``while_loop`` body is counted once, so it is per decode step, as the
analytic row; its bytes count every in-place cache update as touching the whole cache, so
the compiled decode time is an upper bound). Collective traffic over ICI is not in either:
at these sizes the decode step is bound by HBM reads of the weights and caches, and the
train step by its FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax.core.sharding import DEFAULT_RULES, logical_to_spec
from qsharp_jax.distributed import aot
from qsharp_jax.distributed.topologies import GiB, Topology
from qsharp_jax.guidance.model import HeadConfig
from qsharp_jax.models import presets
from qsharp_jax.models.config import ModelConfig

HEADROOM = 0.95  # plan to use at most this fraction of a device's HBM (XLA keeps some for itself)


class PlanError(ValueError):
    """The configuration cannot fit the topology; the message names the knob to change."""


# ---- the workload of a config ------------------------------------------------------------


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _axis_product(mesh_shape: dict, spec_entry) -> int:
    if spec_entry is None:
        return 1
    names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    return math.prod(mesh_shape[n] for n in names)


def batch_shards(mesh_shape: dict, rules: Iterable = DEFAULT_RULES) -> int:
    return _axis_product(mesh_shape, logical_to_spec(("batch",), rules)[0])


def workload_from_config(
    cfg: ml_collections.ConfigDict,
    sample_mesh_shape: dict,
    reference: ModelConfig | None = None,
    guide: ModelConfig | None = None,
    prompt_length: int = 256,
    rules: Iterable = DEFAULT_RULES,
) -> aot.Workload:
    """The largest shapes a run of ``cfg`` compiles. Prompts per batch are padded to the
    batch shards like the sampler does; rows = prompts x max(collect, eval samples); the
    learner's longest bucket. ``prompt_length``: GSM8K prompts in the Llama-3 chat template
    are < 256 tokens, so with ``sampler.prompt_bucket`` 64 their bucket is at most 256."""
    reference = reference or presets.get(cfg.reference.path)
    guide = guide or presets.get(cfg.learner.guide.path or cfg.reference.path)
    s, lc = cfg.sampler, cfg.learner
    layers = int(lc.guide.get("num_layers", -1))
    if layers != -1:  # a smaller guide: the backbone's first layers
        guide = guide.replace(num_layers=min(layers, guide.num_layers))
    shards = batch_shards(sample_mesh_shape, rules)
    prompts = round_up(s.problems_per_batch, int(np.lcm(s.problems_per_batch, shards)))
    h = lc.guide.head
    return aot.Workload(
        reference=reference,
        guide=guide,
        head=HeadConfig(
            kind=h.kind, distribution=h.distribution, num_atoms=h.num_atoms, v_min=h.v_min, v_max=h.v_max, init=h.init
        ),
        reference_dtype=cfg.reference.dtype,
        guide_compute_dtype=lc.compute_dtype,
        guide_param_dtype=lc.param_dtype,
        prompts=prompts,
        samples=max(cfg.collect.samples_per_problem, cfg.eval.samples_per_problem),
        prompt_length=round_up(prompt_length, s.prompt_bucket),
        max_new_tokens=s.max_new_tokens,
        k=s.k,
        guidance=s.guidance,
        learner_batch=lc.batch_size,
        learner_length=max(int(b) for b in lc.buckets),
        remat=bool(lc.remat),
        loss_type=lc.loss_type,
    )


# ---- analytic bytes --------------------------------------------------------------------


def _itemsize(dtype: str) -> int:
    return jnp.dtype(aot.DTYPES[dtype]).itemsize


def _shard_bytes(shape, logical, mesh_shape: dict, itemsize: int, rules) -> int:
    spec = tuple(logical_to_spec(logical, rules)) + (None,) * len(shape)
    return itemsize * math.prod(-(-d // _axis_product(mesh_shape, e)) for d, e in zip(shape, spec))


def params_bytes(model_fn, mesh_shape: dict, rules: Iterable = DEFAULT_RULES) -> int:
    """Per-device bytes of a model's params (built abstractly by ``model_fn``)."""
    _, state = nnx.split(nnx.eval_shape(model_fn))
    specs = nnx.get_partition_spec(state)
    total = 0
    for var, spec in zip(
        jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, nnx.Variable)),
    ):
        v = var.get_value()
        names = tuple(spec.get_value() if isinstance(spec, nnx.Variable) else spec) if spec is not None else None
        total += _shard_bytes(v.shape, names, mesh_shape, v.dtype.itemsize, rules)
    return total


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int, dtype: str, mesh_shape: dict, rules=DEFAULT_RULES):
    per_layer = _shard_bytes(
        (rows, cfg.num_kv_heads, length, cfg.head_dim),
        ("batch", "kv_heads", "cache_length", "head_dim"),
        mesh_shape,
        _itemsize(dtype),
        rules,
    )
    mask = _shard_bytes((rows, length), ("batch", "cache_length"), mesh_shape, 1, rules)
    return 2 * cfg.num_layers * per_layer + mask + 4  # + the int32 write index


def _local(n: int, mesh_shape: dict, logical: str, rules) -> int:
    return -(-n // _axis_product(mesh_shape, logical_to_spec((logical,), rules)[0]))


@dataclasses.dataclass
class Component:
    name: str
    analytic: int
    compiled: int | None = None  # None: no compiled number (no libtpu, or not compiled)


@dataclasses.dataclass
class ProgramPlan:
    name: str
    mesh: dict
    components: list  # of Component
    analytic_flops: float
    analytic_bytes: float
    compiled: aot.CompiledProgram | None = None

    @property
    def analytic_peak(self) -> int:
        return sum(c.analytic for c in self.components)

    @property
    def out_of_memory(self) -> bool:
        """XLA refused the program for HBM overflow (it then reports the temporaries it needs)."""
        return self.compiled is not None and bool(self.compiled.error) and self.compiled.temp_bytes > 0

    @property
    def compiled_peak(self) -> int | None:
        """XLA's peak; after an HBM overflow, a lower bound: the argument shards plus the
        temporaries XLA said it needs."""
        if self.out_of_memory:
            return sum(c.compiled or 0 for c in self.components)
        return None if self.compiled is None or self.compiled.error else self.compiled.peak_bytes

    def step_seconds(self, topo: Topology, compiled: bool = False) -> float:
        chip = topo.chip
        if compiled:
            if self.compiled is None or self.compiled.error:
                return float("nan")
            flops, nbytes = self.compiled.flops, self.compiled.bytes_accessed
        else:
            flops, nbytes = self.analytic_flops, self.analytic_bytes
        return max(flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth)


def _attention_flops(cfg: ModelConfig, queries: int, keys: int) -> float:
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * queries * keys


def analytic_plan(
    w: aot.Workload, sample_mesh: dict, learn_mesh: dict, rules: Iterable = DEFAULT_RULES
) -> dict[str, ProgramPlan]:
    """Per-device bytes and FLOPs of prefill, one decode step and one train step (see module doc)."""
    rules = tuple(rules)
    devices = math.prod(sample_mesh.values())
    ref_dt, g_cdt, g_pdt = w.reference_dtype, w.guide_compute_dtype, w.guide_param_dtype
    ref_c, g_c = w.reference, w.guide
    mk_ref = lambda: aot.Decoder(
        ref_c, dtype=aot.DTYPES[ref_dt], param_dtype=aot.DTYPES[ref_dt], rules=rules, rngs=nnx.Rngs(0)
    )

    def mk_guide():
        backbone = aot.Decoder(
            g_c, dtype=aot.DTYPES[g_cdt], param_dtype=aot.DTYPES[g_pdt], rules=rules, rngs=nnx.Rngs(0)
        )
        return aot.build_head(backbone, w.head, seed=0)

    ref_w = params_bytes(mk_ref, sample_mesh, rules)
    guide_w = params_bytes(mk_guide, sample_mesh, rules)
    ref_kv = kv_cache_bytes(ref_c, w.rows, w.cache_length, ref_dt, sample_mesh, rules)
    guide_kv = kv_cache_bytes(g_c, w.rows, w.cache_length, g_cdt, sample_mesh, rules)
    tensor_s = lambda logical, n: _local(n, sample_mesh, logical, rules)

    # prefill: one layer's transients of the larger model, plus the prompt-sized caches
    b_p, length = _local(w.prompts, sample_mesh, "batch", rules), w.prompt_length - 1
    small_caches = kv_cache_bytes(ref_c, w.prompts, length, ref_dt, sample_mesh, rules) + kv_cache_bytes(
        g_c, w.prompts, length, g_cdt, sample_mesh, rules
    )

    def layer_transient(cfg, dtype):
        scores = 10 * b_p * tensor_s("q_heads", cfg.num_heads) * length * (length + 1)
        mlp = 3 * _itemsize(dtype) * b_p * length * tensor_s("mlp", cfg.intermediate_size)
        return scores + mlp

    prefill_act = small_caches + max(layer_transient(ref_c, ref_dt), layer_transient(g_c, g_cdt))
    prefill_tokens = w.prompts * length
    prefill = ProgramPlan(
        "prefill",
        sample_mesh,
        [
            Component("reference weights", ref_w),
            Component("guide weights", guide_w),
            Component("reference KV cache", ref_kv),
            Component("guide KV cache", guide_kv),
            Component("activations", prefill_act),
        ],
        analytic_flops=(
            prefill_tokens * (ref_c.matmul_flops_per_token(lm_head=False) + g_c.matmul_flops_per_token(lm_head=False))
            + w.prompts * (_attention_flops(ref_c, length, length) + _attention_flops(g_c, length, length))
        )
        / devices,
        analytic_bytes=ref_w + guide_w + ref_kv + guide_kv,
    )

    # decode: per-step vocab-sized float32 buffers, plus the loop's [rows, T] outputs
    b_d = _local(w.rows, sample_mesh, "batch", rules)
    vocab_act = 6 * 4 * b_d * ref_c.vocab_size
    outputs = 4 * 4 * b_d * w.max_new_tokens
    # the guide's float32 params cast once to its compute dtype (hoisted out of the loop), and
    # a second copy of both caches: XLA's TPU layout assignment keeps the loop-carried caches in
    # another layout than the arguments and copies them (a `copy` of every cache layer in the HLO)
    guide_cast = guide_w * _itemsize(g_cdt) // _itemsize(g_pdt) if g_cdt != g_pdt else 0
    loop_copy = ref_kv + guide_kv
    guide_tokens = 1 + w.k if w.head.kind == "v" else 1
    decode = ProgramPlan(
        "decode",
        sample_mesh,
        [
            Component("reference weights", ref_w),
            Component("guide weights", guide_w),
            Component("reference KV cache", ref_kv),
            Component("guide KV cache", guide_kv),
            Component("activations", vocab_act + outputs + guide_cast + loop_copy),
        ],
        analytic_flops=(
            w.rows
            * (
                ref_c.matmul_flops_per_token(lm_head=True)
                + guide_tokens * g_c.matmul_flops_per_token(lm_head=False)
                + _attention_flops(ref_c, 1, w.cache_length)
                + _attention_flops(g_c, guide_tokens, w.cache_length)
            )
        )
        / devices,
        analytic_bytes=ref_w + guide_w + ref_kv + guide_kv,
    )

    # train step on the learner mesh
    learn_devices = math.prod(learn_mesh.values())
    lw = params_bytes(mk_guide, learn_mesh, rules)
    f32_params = lw * 4 // _itemsize(g_pdt)
    b_t, t = _local(w.learner_batch, learn_mesh, "batch", rules), w.learner_length
    heads_l = _local(g_c.num_heads, learn_mesh, "q_heads", rules)
    act_size = _itemsize(g_cdt)
    e, m, d = g_c.hidden_size, _local(g_c.intermediate_size, learn_mesh, "mlp", rules), g_c.head_dim
    qkv = (heads_l + 2 * _local(g_c.num_kv_heads, learn_mesh, "kv_heads", rules)) * d
    per_token = 4 * qkv + 4 * 2 * m + 3 * 4 * e  # see the module docstring
    per_layer = b_t * (heads_l * t * t * (4 + act_size) + t * per_token)
    backward = b_t * heads_l * t * t * 8  # one layer's float32 gradients of the probabilities and scores
    if w.remat:
        train_act = g_c.num_layers * b_t * t * e * act_size + per_layer + backward
    else:
        train_act = g_c.num_layers * per_layer + backward
    tokens = w.learner_batch * t
    matmul = g_c.matmul_flops_per_token(lm_head=False) * tokens + _attention_flops(g_c, t, t) * w.learner_batch
    train = ProgramPlan(
        "train_step",
        learn_mesh,
        [
            Component("guide weights", lw),
            Component("optimizer state + gradients", 3 * f32_params),
            Component("activations", train_act),
        ],
        analytic_flops=(4 if w.remat else 3) * matmul / learn_devices,
        analytic_bytes=lw * 2 + 3 * f32_params * 2 + 2 * train_act,
    )
    return {"prefill": prefill, "decode": decode, "train_step": train}


# ---- compiled numbers -------------------------------------------------------------------


def _sharded_bytes(structs) -> int:
    total = 0
    for leaf in jax.tree.leaves(structs):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def compiled_components(name: str, w: aot.Workload, mesh: Mesh, rules, compiled: aot.CompiledProgram) -> dict:
    """Component bytes of a compiled program: its arguments' shards and XLA's temporaries."""
    out = {"activations": compiled.temp_bytes or None}  # on an HBM overflow: what XLA said it needs
    if name == "train_step":
        _, params = aot.abstract_guide(w, mesh, rules)
        out["guide weights"] = _sharded_bytes(params)
        # moments + gradients: the state arguments beyond the params, and the gradients XLA holds
        out["optimizer state + gradients"] = 3 * _sharded_bytes(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), params)
        )
        return out
    _, ref = aot.abstract_reference(w, mesh, rules)
    _, guide = aot.abstract_guide(w, mesh, rules)
    ref_cache, guide_cache = aot.cache_structs(w, mesh, rules)
    out.update(
        {
            "reference weights": _sharded_bytes(ref),
            "guide weights": _sharded_bytes(guide),
            "reference KV cache": _sharded_bytes(ref_cache),
            "guide KV cache": _sharded_bytes(guide_cache),
        }
    )
    return out


def plan(
    w: aot.Workload,
    topo: Topology,
    sample_mesh: tuple[int, int, int],
    learn_mesh: tuple[int, int, int],
    *,
    compile: bool = True,
    rules: Iterable = DEFAULT_RULES,
    programs: Iterable[str] = aot.PROGRAMS,
) -> dict[str, ProgramPlan]:
    """Analytic plan, with XLA's numbers beside it when ``compile`` (needs libtpu)."""
    rules = tuple(rules)
    axes = ("data", "fsdp", "tensor")
    s_shape, l_shape = dict(zip(axes, sample_mesh)), dict(zip(axes, learn_mesh))
    plans = analytic_plan(w, s_shape, l_shape, rules)
    plans = {k: v for k, v in plans.items() if k in programs}
    if not compile:
        return plans
    devices = topo.devices()
    s_mesh, l_mesh = aot.meshes_for(devices, sample_mesh, learn_mesh)
    compiled = aot.compile_programs(w, s_mesh, l_mesh, rules, programs=list(plans))
    for name, p in plans.items():
        p.compiled = compiled[name]
        mesh = l_mesh if name == "train_step" else s_mesh
        numbers = compiled_components(name, w, mesh, rules, p.compiled)
        for c in p.components:
            c.compiled = numbers.get(c.name)
    return plans


# ---- fitting and reporting ---------------------------------------------------------------

_CACHE_KNOB = (
    "lower sampler.problems_per_batch, collect/eval.samples_per_problem or sampler.max_new_tokens "
    "(cache rows x length), or raise mesh.tensor to split the KV heads"
)
_KNOBS = {
    ("prefill", "activations"): "lower sampler.problems_per_batch (prompts per prefill) or sampler.prompt_bucket",
    ("prefill", "reference KV cache"): _CACHE_KNOB,
    ("decode", "reference KV cache"): _CACHE_KNOB,
    ("prefill", "guide KV cache"): _CACHE_KNOB,
    ("decode", "guide KV cache"): _CACHE_KNOB,
    ("decode", "activations"): "lower sampler.problems_per_batch (rows per decode step) or raise mesh.tensor",
    ("decode", "reference weights"): "raise mesh.tensor or use a larger topology (the reference's weights)",
    ("prefill", "reference weights"): "raise mesh.tensor or use a larger topology (the reference's weights)",
    ("decode", "guide weights"): "set learner.param_dtype='bfloat16' or raise mesh.tensor",
    ("prefill", "guide weights"): "set learner.param_dtype='bfloat16' or raise mesh.tensor",
    ("train_step", "activations"): "set learner.remat=True, lower learner.batch_size, or shorten learner.buckets",
    ("train_step", "optimizer state + gradients"): "raise mesh.fsdp (more chips) or use a smaller guide",
    ("train_step", "guide weights"): "raise mesh.fsdp (more chips) or use a smaller guide",
}


def check_fits(plans: dict[str, ProgramPlan], topo: Topology, headroom: float = HEADROOM) -> None:
    """Raise PlanError for each program whose peak exceeds ``headroom`` x HBM, naming the
    component that dominates and the knob that shrinks it. Uses compiled numbers when present."""
    limit = headroom * topo.chip.hbm_bytes
    bad = []
    for name, p in plans.items():
        if p.compiled is not None and p.compiled.error and not p.out_of_memory:
            bad.append(f"{name}: XLA could not compile it for {topo.name}: {p.compiled.error}")
            continue
        peak = p.compiled_peak if p.compiled_peak is not None else p.analytic_peak
        if peak <= limit:
            continue
        worst = max(p.components, key=lambda c: c.compiled if c.compiled is not None else c.analytic)
        bad.append(
            f"{name} needs {'at least ' * p.out_of_memory}{peak / GiB:.1f} GiB per device on {topo.name} "
            f"(limit {limit / GiB:.1f} GiB of "
            f"{topo.chip.hbm_bytes / GiB:.0f} GiB HBM), mostly {worst.name} "
            f"({(worst.compiled or worst.analytic) / GiB:.1f} GiB): "
            f"{_KNOBS.get((name, worst.name), 'change the mesh or the batch sizes')}"
        )
    if bad:
        raise PlanError(f"the config does not fit {topo.name}:\n  " + "\n  ".join(bad))


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def format_plan(plans: dict[str, ProgramPlan], topo: Topology, w: aot.Workload) -> str:
    """The planner's table: GiB per device, analytic | compiled, and roofline times."""
    lines = [
        f"{topo.name} ({topo.topology_name}, {topo.num_devices} devices, {topo.num_hosts} host(s), "
        f"{topo.chip.hbm_bytes / GiB:.0f} GiB HBM, {topo.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{topo.chip.hbm_bandwidth / 1e9:.0f} GB/s per device)",
        f"workload: {w.prompts} prompts x {w.samples} samples = {w.rows} rows, prompt {w.prompt_length}, "
        f"{w.max_new_tokens} new tokens, k={w.k}, reference {w.reference_dtype}, guide "
        f"{w.guide_param_dtype}/{w.guide_compute_dtype}, learner batch {w.learner_batch} x {w.learner_length}"
        f"{' (remat)' if w.remat else ''}",
        "",
        f"{'program':<11} {'component':<29} {'analytic GiB':>12} {'compiled GiB':>12}",
    ]
    for name, p in plans.items():
        mesh = "x".join(str(v) for v in p.mesh.values())
        for i, c in enumerate(p.components):
            label = f"{name}" if i == 0 else ""
            lines.append(f"{label:<11} {c.name:<29} {_gib(c.analytic):>12} {_gib(c.compiled):>12}")
        fits = lambda b: "-" if b is None else ("fits" if b <= HEADROOM * topo.chip.hbm_bytes else "DOES NOT FIT")
        compiled_peak = (">=" if p.out_of_memory else "") + _gib(p.compiled_peak)
        lines.append(
            f"{'':<11} {'peak (mesh ' + mesh + ')':<29} {_gib(p.analytic_peak):>12} {compiled_peak:>12}"
            f"  {fits(p.analytic_peak)} / {fits(p.compiled_peak)}"
        )
        if p.compiled is not None and p.compiled.error:
            lines.append(f"{'':<11} XLA: {p.compiled.error}")
    lines += ["", f"{'roofline':<11} {'':<29} {'analytic ms':>12} {'compiled ms':>12}"]
    for name, p in plans.items():
        what = {"prefill": "prefill (one call)", "decode": "decode step (all rows)", "train_step": "train step"}[name]
        compiled = p.step_seconds(topo, compiled=True) * 1e3 if p.compiled is not None else None
        lines.append(
            f"{name:<11} {what:<29} {p.step_seconds(topo) * 1e3:>12.2f} "
            f"{'-' if compiled is None else f'{compiled:.2f}':>12}"
        )
    if "decode" in plans:
        d = plans["decode"]
        per_call = d.step_seconds(topo) * w.max_new_tokens
        lines.append(
            f"{'':<11} {'decode call, analytic':<29} {per_call:>11.1f}s  ({w.max_new_tokens} steps, "
            f"{w.rows * w.max_new_tokens / per_call:,.0f} tokens/s)"
        )
    return "\n".join(lines)


# ---- from a config -------------------------------------------------------------------------


def resolve_mesh(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """``cfg.mesh`` (one axis may be -1) as concrete (data, fsdp, tensor) for ``num_devices``."""
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise PlanError(f"mesh={dict(mesh_cfg)} does not divide the {num_devices} devices of the topology.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise PlanError(
            f"mesh={dict(mesh_cfg)} has {math.prod(sizes)} devices but the topology has {num_devices}: "
            "make data x fsdp x tensor equal it (or set one axis to -1)."
        )
    return tuple(sizes)


def meshes(cfg, topo: Topology, mesh: str, kv_heads: int) -> tuple[tuple, tuple]:
    """(sampling mesh, learning mesh): the topology presets, or cfg.mesh for both (what the
    job runs today: one mesh for everything)."""
    if mesh == "preset":
        return topo.sample_mesh(kv_heads), topo.learn_mesh()
    one = resolve_mesh(cfg.mesh, topo.num_devices)
    return one, one


def plan_config(
    cfg,
    topology: str | Topology,
    *,
    reference: ModelConfig | None = None,
    guide: ModelConfig | None = None,
    mesh: str = "preset",
    prompt_length: int = 256,
    compile: bool = True,
    rules: Iterable = DEFAULT_RULES,
    programs: Iterable[str] = aot.PROGRAMS,
) -> str:
    """The planner's report for a config on a topology (compiled numbers when libtpu works)."""
    from qsharp_jax.distributed import topologies

    topo = topology if isinstance(topology, Topology) else topologies.get(topology)
    reference = reference or presets.get(cfg.reference.path)
    guide = guide or presets.get(cfg.learner.guide.path or cfg.reference.path)
    sample, learn = meshes(cfg, topo, mesh, min(reference.num_kv_heads, guide.num_kv_heads))
    w = workload_from_config(cfg, dict(zip(("data", "fsdp", "tensor"), sample)), reference, guide, prompt_length, rules)
    note = ""
    if compile:
        try:
            topo.devices()
        except topologies.TopologyError as e:
            compile, note = False, f"\n(compiled column empty: {e})"
    unknown = sorted(set(programs) - set(aot.PROGRAMS))
    if unknown:
        raise PlanError(f"unknown programs {unknown}; choose from {aot.PROGRAMS}.")
    plans = plan(w, topo, sample, learn, compile=compile, rules=rules, programs=programs)
    verdict = "fits"
    try:
        check_fits(plans, topo)
    except PlanError as e:
        verdict = str(e)
    return f"{format_plan(plans, topo, w)}\n\nverdict: {verdict}{note}"


def check_config(cfg, topology: str | Topology, rules: Iterable = DEFAULT_RULES) -> dict[str, ProgramPlan]:
    """The job's guard: the analytic plan of ``cfg`` on ``topology`` with the config's own mesh
    (milliseconds, nothing loaded or compiled); raises PlanError naming the knob to change."""
    from qsharp_jax.distributed import topologies

    topo = topology if isinstance(topology, Topology) else topologies.get(topology)
    reference = presets.get(cfg.reference.path)
    guide = presets.get(cfg.learner.guide.path or cfg.reference.path)
    sample, learn = meshes(cfg, topo, "config", reference.num_kv_heads)
    w = workload_from_config(cfg, dict(zip(("data", "fsdp", "tensor"), sample)), reference, guide, rules=rules)
    plans = plan(w, topo, sample, learn, compile=False, rules=rules)
    check_fits(plans, topo)
    return plans
