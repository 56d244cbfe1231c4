"""The Q# learner: fit a guidance model to classifier examples (spec 2.3, 3, 7).

``fit(guide, examples, cfg)`` builds (or takes) the guidance model, lays the training
state out on the mesh, resumes from the latest checkpoint if there is one, and runs the
jitted train step over length-bucketed batches, logging metrics and saving Orbax
checkpoints. The learner config keys live in :func:`qsharp_jax.config.learner_defaults` (the ``learner``
section that ``configs/gsm8k.py`` embeds).

Determinism: batch order is a function of (seed, epoch, position) and the step's RNG is
part of the saved state, so a run killed at any point and resumed ends with the same
params as an uninterrupted one (bit-identical on CPU with the same mesh).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax.checkpoints import files, loader, training as checkpointing
from qsharp_jax.core import losses, metrics, multihost, optim
from qsharp_jax.core.sharding import DEFAULT_RULES, check_model_fits, make_mesh
from qsharp_jax.guidance import batching, train_step as ts
from qsharp_jax.guidance.model import DISTRIBUTIONS, INITS, KINDS, GuidanceModel, HeadConfig, build as build_head
from qsharp_jax.models import decoder as model_lib
from qsharp_jax.models.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate_learner_config(c: ml_collections.ConfigDict) -> None:
    """Raise ValueError listing every bad learner setting (before anything compiles)."""
    bad = []

    def need(ok, key, why):
        if not ok:
            bad.append(f"learner.{key}={c.get(key)!r}: {why}")

    need(c.lr > 0 and math.isfinite(c.lr), "lr", "must be a positive finite number")
    need(c.schedule in optim.SCHEDULES, "schedule", f"must be one of {optim.SCHEDULES}")
    need(c.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(0.0 <= c.end_lr_factor <= 1.0, "end_lr_factor", "must be in [0, 1]")
    need(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= c.adam_b1 < 1 and 0 <= c.adam_b2 < 1, "adam_b1", "adam_b1 and adam_b2 must be in [0, 1)")
    need(c.adam_eps > 0, "adam_eps", "must be > 0")
    need(c.clip >= 0, "clip", "must be >= 0 (0 disables clipping)")
    need(isinstance(c.batch_size, int) and c.batch_size >= 1, "batch_size", "must be a positive integer")
    need(c.epochs >= 1 or c.max_steps > 0, "epochs", "must be >= 1 (or set max_steps > 0)")
    need(
        len(c.buckets) > 0 and all(int(b) >= 2 for b in c.buckets),
        "buckets",
        "must be a non-empty list of lengths >= 2",
    )
    need(c.loss_type in losses.LOSS_TYPES, "loss_type", f"must be one of {losses.LOSS_TYPES}")
    need(
        c.categorical_target in losses.CATEGORICAL_TARGETS,
        "categorical_target",
        f"must be one of {losses.CATEGORICAL_TARGETS}",
    )
    need(c.compute_dtype in DTYPES, "compute_dtype", f"must be one of {tuple(DTYPES)}")
    need(c.param_dtype in DTYPES, "param_dtype", f"must be one of {tuple(DTYPES)}")
    need(c.keep >= 1, "keep", "must be >= 1")
    need(c.save_every >= 1, "save_every", "must be >= 1")
    need(c.log_every >= 1, "log_every", "must be >= 1")
    need(c.calibration_bins >= 1, "calibration_bins", "must be >= 1")
    layers = c.guide.num_layers
    if not (isinstance(layers, int) and (layers == -1 or layers >= 1)):
        bad.append(f"learner.guide.num_layers={layers!r}: must be -1 (all layers) or >= 1")
    head = c.guide.head
    if head.kind not in KINDS or head.distribution not in DISTRIBUTIONS or head.init not in INITS:
        bad.append(
            f"learner.guide.head={head.to_dict()}: kind in {KINDS}, distribution in {DISTRIBUTIONS}, init in {INITS}"
        )
    elif c.loss_type in losses.LOSS_TYPES and losses.LOSS_DISTRIBUTION[c.loss_type] != head.distribution:
        bad.append(
            f"learner.loss_type={c.loss_type!r} needs guide.head.distribution="
            f"{losses.LOSS_DISTRIBUTION[c.loss_type]!r}, not {head.distribution!r}"
        )
    if bad:
        raise ValueError("bad learner config:\n  " + "\n  ".join(bad))


def head_config(c: ml_collections.ConfigDict) -> HeadConfig:
    h = c.guide.head
    return HeadConfig(
        kind=h.kind,
        distribution=h.distribution,
        num_atoms=int(h.num_atoms),
        v_min=float(h.v_min),
        v_max=float(h.v_max),
        init=h.init,
    )


# ---- guidance model construction ----------------------------------------------------


def check_same_tokenizer(
    guide_tokenizer, reference_tokenizer, guide_name: str, reference_name: str, guide_vocab_size: int | None = None
) -> None:
    """The guide reads and scores the reference's token ids, so both must map the same
    strings to the same ids (spec 3: the authors assert it)."""
    gv, rv = guide_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    problems = []
    if len(gv) != len(rv):
        problems.append(f"vocab sizes differ: guide {len(gv)} vs reference {len(rv)}")
    differing = sorted(t for t in set(gv) | set(rv) if gv.get(t) != rv.get(t))
    if differing:
        shown = ", ".join(f"{t!r}: guide {gv.get(t)} / reference {rv.get(t)}" for t in differing[:5])
        problems.append(f"{len(differing)} tokens map to different ids (e.g. {shown})")
    if guide_vocab_size is not None and rv and max(rv.values()) >= guide_vocab_size:
        problems.append(f"reference ids reach {max(rv.values())} but the guide embeds only {guide_vocab_size}")
    if problems:
        raise ValueError(
            f"tokenizer mismatch between the guidance model ({guide_name}) and the reference model "
            f"({reference_name}): " + "; ".join(problems) + ". The guide must share the reference's tokenizer: "
            "set learner.guide.path to a model of the reference's family (e.g. the reference itself or a smaller "
            "sibling), or change the reference model."
        )


def build_guidance_model(
    c: ml_collections.ConfigDict, mesh: Mesh | None = None, rules: Iterable = DEFAULT_RULES, reference_tokenizer=None
) -> tuple[GuidanceModel, Any]:
    """Backbone through the foundation loader + a fresh head; returns (model, tokenizer).

    The tokenizer is checked against ``reference_tokenizer`` (or the one at
    ``guide.reference_path``) when either is given."""
    guide_path = c.guide.path or None
    loaded = loader.load(
        guide_path, dtype=DTYPES[c.compute_dtype], param_dtype=DTYPES[c.param_dtype], mesh=mesh, rules=rules
    )
    guide_name = guide_path or files.default_reference_path()
    ref_name = c.guide.reference_path or "the reference model"
    if reference_tokenizer is None and c.guide.reference_path:
        reference_tokenizer = loader.load_tokenizer(c.guide.reference_path)
    if reference_tokenizer is not None:
        if loaded.tokenizer is None:
            raise ValueError(
                f"the guidance model {guide_name} ships no tokenizer, so it cannot be checked against "
                f"{ref_name}: convert it with its tokenizer files."
            )
        check_same_tokenizer(loaded.tokenizer, reference_tokenizer, guide_name, ref_name, loaded.config.vocab_size)
    backbone = loaded.model
    if c.guide.num_layers != -1:  # a smaller guide of the same family: its first layers
        model_lib.truncate_layers(backbone, int(c.guide.num_layers))
    if hasattr(backbone, "remat"):
        backbone.remat = bool(c.remat)
    return build_head(backbone, head_config(c), seed=c.guide.head_seed), loaded.tokenizer


# ---- data identity ---------------------------------------------------------------------


def dataset_fingerprint(examples: Sequence) -> str:
    """Hash of every example's ids, reward and weight: a resumed run must see the same data."""
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        h.update(np.asarray(ex.input_ids, np.int64).tobytes() + b"|")
        h.update(np.asarray(ex.target_ids, np.int64).tobytes() + b"|")
        h.update(np.asarray([ex.reward, ex.weight], np.float64).tobytes())
    return h.hexdigest()


def check_examples(examples: Sequence) -> None:
    for i, ex in enumerate(examples):
        if not (math.isfinite(ex.reward) and math.isfinite(ex.weight)) or ex.weight < 0:
            raise ValueError(
                f"example {i}: reward={ex.reward}, weight={ex.weight}; rewards must be finite and "
                "weights finite and >= 0."
            )


# ---- fit ---------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    state: optim.TrainState
    graphdef: Any
    steps_run: int  # steps taken by this call (0 when the checkpoint was already complete)
    tokens_per_s: float  # non-pad tokens/s over this call's steps, except those that compiled
    history: list  # the logged scalars, one dict (with "step") per log_every steps
    padded_fraction: dict = dataclasses.field(default_factory=dict)  # bucketed / packed pad-token fractions

    @property
    def model(self) -> GuidanceModel:
        return nnx.merge(self.graphdef, self.state.params)


def fit(
    guide: GuidanceModel | ml_collections.ConfigDict | None,
    examples: Sequence,
    cfg: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    rules: Iterable = DEFAULT_RULES,
    reference_tokenizer=None,
) -> FitResult:
    """Train a guidance model on classifier examples; resume from ``cfg.checkpoint_dir`` if it
    holds a checkpoint of the same data.

    guide: a GuidanceModel (its dtypes are used as they are), or a ``guide`` config section / None
    (then built via the loader from that section / ``cfg.guide``). Its arrays are not consumed.
    examples: objects with input_ids, target_ids, reward, weight (e.g. ``collect.ClassifierExample``).
    cfg: the learner config (:func:`qsharp_jax.config.learner_defaults`).
    mesh: default all devices on the 'fsdp' axis. SIGTERM saves and raises
    :class:`checkpointing.Preempted`; a non-finite loss raises FloatingPointError.
    """
    validate_learner_config(cfg)
    check_examples(examples)  # cheap checks first: before a model is loaded or anything compiles
    data = batching.bucket_examples(examples, cfg.buckets)
    rules = tuple(rules)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1) if mesh is None else mesh
    # packing (several examples per row, attention kept within each) unless learner.pack is False
    pack = bool(cfg.get("pack", True))
    padding = dict(bucketed=batching.bucketed_padded_fraction(data, cfg.batch_size))
    if pack:
        shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        packed = batching.pack_examples(data, cfg.batch_size, row_multiple=shards)
        stream = batching.PackedStream(packed, cfg.seed, cfg.pad_id)
        rows_per_batch = packed.rows_per_batch
        padding.update(packed=packed.padded_fraction(), row_length=packed.row_length, rows_per_batch=rows_per_batch)
    else:
        stream = batching.BatchStream(data, cfg.batch_size, cfg.seed, cfg.pad_id)
        rows_per_batch = cfg.batch_size
    if isinstance(guide, ml_collections.ConfigDict):  # a `guide` section overriding cfg.guide
        cfg = cfg.copy_and_resolve_references()
        cfg.guide = guide
        validate_learner_config(cfg)
    if not isinstance(guide, GuidanceModel):
        guide, _ = build_guidance_model(cfg, mesh, rules, reference_tokenizer)
    head = guide.head_cfg
    if head != head_config(cfg):
        cfg = cfg.copy_and_resolve_references()
        cfg.guide.head.update(dataclasses.asdict(head))  # record the model's actual head
    losses.check_loss_matches_head(cfg.loss_type, head.distribution)
    check_model_fits(guide.cfg, mesh, rules, batch=cfg.batch_size, name="guidance model")
    check_model_fits(guide.cfg, mesh, rules, batch=rows_per_batch, name="guidance model (packed rows)")

    total_steps = cfg.epochs * stream.batches_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps) if cfg.epochs >= 1 else cfg.max_steps
    data_id = dict(
        seed=cfg.seed, batches_per_epoch=stream.batches_per_epoch, fingerprint=dataset_fingerprint(examples), pack=pack
    )

    schedule = optim.learning_rate_schedule(cfg.lr, cfg.warmup_steps, cfg.schedule, total_steps, cfg.end_lr_factor)
    tx = optim.make_optimizer(
        schedule, weight_decay=cfg.weight_decay, clip=cfg.clip, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps
    )
    graphdef, params = nnx.split(guide)
    step_fn = ts.make_train_step(
        graphdef,
        tx,
        schedule,
        head,
        loss_type=cfg.loss_type,
        categorical_target=cfg.categorical_target,
        calibration_bins=cfg.calibration_bins,
    )
    effective = dict(
        learner=cfg.to_dict(),
        model_config=guide.cfg.to_json_dict(),
        mesh=dict(mesh.shape),
        model_dtypes=dict(
            compute=jnp.dtype(guide.backbone.dtype).name, params=jnp.dtype(guide.backbone.embed.get_value().dtype).name
        ),
        num_examples=len(examples),
        dropped=data.num_dropped,
        truncated=data.num_truncated,
        padded_fraction=padding,  # pad tokens / all tokens of an epoch: bucketed, and packed when on
        total_steps=total_steps,
        **data_id,
    )

    ckpt = None
    if cfg.checkpoint_dir:
        ckpt = checkpointing.Checkpointer(cfg.checkpoint_dir, keep=cfg.keep, async_save=cfg.async_checkpointing)
        if multihost.is_main():  # one writer; the Orbax checkpoints themselves are saved by every process
            checkpointing.write_config(cfg.checkpoint_dir, effective)
    logdir = cfg.logdir or (f"{cfg.checkpoint_dir}/tensorboard" if cfg.checkpoint_dir else None)

    with jax.set_mesh(mesh):
        init = lambda p: optim.init_train_state(p, tx, cfg.seed)
        abstract = jax.eval_shape(init, params)
        state_sharding = optim.train_state_shardings(abstract, mesh, rules)
        batch_sharding = ts.batch_shardings(mesh, rows_per_batch, rules, packed=pack)
        if ckpt is not None and ckpt.latest_step() is not None:
            state, position, _ = ckpt.restore(checkpointing.restore_target(abstract, state_sharding))
            saved_id = {k: position.get(k) for k in data_id}
            if saved_id != data_id:
                raise ValueError(
                    f"{cfg.checkpoint_dir} holds a run on different data or seed ({saved_id}) than this "
                    f"one ({data_id}); use a new learner.checkpoint_dir (or delete the old one)."
                )
        else:
            params = jax.device_put(params, state_sharding.params)
            state = jax.jit(init, out_shardings=state_sharding)(params)
        del params, guide  # the state owns the (donated) buffers from here on
        train = optim.jit_train_step(step_fn, state_sharding, batch_sharding, mesh)
        result = _loop(train, state, stream, total_steps, batch_sharding, cfg, ckpt, effective, data_id, logdir)
    return FitResult(
        state=result[0],
        graphdef=graphdef,
        steps_run=result[1],
        tokens_per_s=result[2],
        history=result[3],
        padded_fraction=padding,
    )


def _to_device(host_batch: dict, shardings: dict) -> dict:
    """Global batch arrays from the full host batch: every process computes the same batch (it is a
    pure function of seed and step) and supplies the rows of its own devices, so this also works
    on multi-host pod slices."""
    return {
        k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in host_batch.items()
    }


def _loop(train, state, stream, total_steps, batch_sharding, cfg, ckpt, effective, data_id, logdir):
    start = int(jax.device_get(state.step))
    # multi-host: only process 0 logs, shows the bar and writes TensorBoard events
    writer = metrics.MetricsWriter(
        logdir, total_steps, start, disable_bar=not cfg.progress_bar, quiet=not multihost.is_main()
    )
    last_saved = start
    history = []

    def save(st):
        nonlocal last_saved
        step = int(jax.device_get(st.step))
        if ckpt is not None and step != last_saved:
            epoch, pos = stream.position_of_step(step)
            ckpt.save(st, dict(step=step, epoch=epoch, position=pos, **data_id), effective)
            last_saved = step

    calib, window = None, dict(loss=0.0, grad_norm=0.0, n=0, tokens=0, t0=time.perf_counter())
    timed_tokens, timed_seconds, shapes_seen = 0, 0.0, set()
    try:
        with checkpointing.SigtermGuard() as sigterm:
            for step in range(start, total_steps):
                t_step = time.perf_counter()
                host_batch = stream.batch(*stream.position_of_step(step))
                new_shape = host_batch["tokens"].shape not in shapes_seen  # this step compiles
                shapes_seen.add(host_batch["tokens"].shape)
                batch = _to_device(host_batch, batch_sharding)
                state, stats = train(state, batch)
                stats = jax.device_get(stats)  # one host sync per step: NaN check before anything is saved
                if not stats["finite"]:
                    if ckpt is not None:
                        ckpt.wait()  # let earlier (good) saves finish; this state is never saved
                    where = (
                        f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
                        if ckpt
                        else "no checkpoint_dir was set"
                    )
                    raise FloatingPointError(
                        f"non-finite training loss ({stats['loss']}, grad norm {stats['grad_norm']}) at step "
                        f"{step + 1}; stopped without saving this state ({where}). Lower learner.lr, enable "
                        "learner.clip, or check the rewards and the model's dtype."
                    )
                tokens = int(stats["tokens"])
                if not new_shape:  # steps that compiled a new bucket shape are not timed
                    timed_tokens += tokens
                    timed_seconds += time.perf_counter() - t_step
                calib = metrics.add_sums(calib, stats["calibration"])
                window["loss"] += float(stats["loss"])
                window["grad_norm"] += float(stats["grad_norm"])
                window["n"] += 1
                window["tokens"] += tokens
                writer.step()
                done = step + 1
                if done % cfg.log_every == 0 or done == total_steps:
                    elapsed = time.perf_counter() - window["t0"]
                    summary = metrics.summarize_calibration(calib)
                    logged = dict(
                        loss=window["loss"] / window["n"],
                        grad_norm=window["grad_norm"] / window["n"],
                        lr=float(stats["lr"]),
                        ece=summary["ece"],
                        explained_variance=summary["explained_variance"],
                        tokens_per_s=window["tokens"] / max(elapsed, 1e-9),
                    )
                    writer.scalars(done, logged)
                    history.append(dict(step=done, **logged))
                    writer.reliability(done, summary["reliability"])
                    calib, window = None, dict(loss=0.0, grad_norm=0.0, n=0, tokens=0, t0=time.perf_counter())
                if done % cfg.save_every == 0:
                    save(state)
                # multi-host: SIGTERM reaches the hosts at different steps; all save the same one
                if multihost.any_process(sigterm.requested):
                    save(state)
                    if ckpt is not None:
                        ckpt.wait()
                    raise checkpointing.Preempted(done, ckpt.directory if ckpt else "(no checkpoint_dir)")
            save(state)
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()  # waits for pending (good) saves
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds > 0 else float("nan")
    return state, total_steps - start, tokens_per_s, history


# ---- reading a trained guide back -------------------------------------------------------


def load_trained_guide(
    checkpoint_dir: str, *, step: int | None = None, mesh: Mesh | None = None, rules: Iterable = DEFAULT_RULES
) -> GuidanceModel:
    """The guidance model saved by :func:`fit` in ``checkpoint_dir`` (latest step by default).

    The model is rebuilt abstractly from the effective config saved beside the checkpoints
    (backbone architecture, dtypes, head), so the backbone's source weights are not needed.
    """
    path = os.path.join(os.path.abspath(checkpoint_dir), checkpointing.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: pass a learner.checkpoint_dir written by the learner "
            "(it holds effective_config.json and numbered step folders)."
        )
    with open(path) as f:
        effective = json.load(f)
    cfg = ml_collections.ConfigDict(effective["learner"])
    model_cfg = ModelConfig.from_json_dict(effective["model_config"])
    dtypes = effective["model_dtypes"]
    rules = tuple(rules)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1) if mesh is None else mesh
    check_model_fits(model_cfg, mesh, rules, name="guidance model")

    def make():
        backbone = model_lib.Decoder(
            model_cfg,
            dtype=jnp.dtype(dtypes["compute"]),
            param_dtype=jnp.dtype(dtypes["params"]),
            rules=rules,
            rngs=nnx.Rngs(0),
        )
        return build_head(backbone, head_config(cfg), seed=0)

    graphdef, abstract_params = nnx.split(nnx.eval_shape(make))
    # The optimizer only shapes the restore target: the same structure fit() saved.
    schedule = optim.learning_rate_schedule(
        cfg.lr, cfg.warmup_steps, cfg.schedule, effective["total_steps"], cfg.end_lr_factor
    )
    tx = optim.make_optimizer(
        schedule, weight_decay=cfg.weight_decay, clip=cfg.clip, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps
    )
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(lambda p: optim.init_train_state(p, tx, cfg.seed), abstract_params)
        target = checkpointing.restore_target(abstract, optim.train_state_shardings(abstract, mesh, rules))
        ckpt = checkpointing.Checkpointer(checkpoint_dir, async_save=False)
        try:
            state, _, _ = ckpt.restore(target, step)
        finally:
            ckpt.close()
    return nnx.merge(graphdef, state.params)
