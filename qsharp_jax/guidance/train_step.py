"""The guidance-model train step: a pure, jitted, sharded function
``(TrainState, batch) -> (TrainState, metrics)``.

* Optimizer: optax AdamW (float32 moments) after clip_by_global_norm, with a warmup +
  constant or cosine learning-rate schedule.
* Precision: master weights float32, compute in the decoder's ``dtype`` (bfloat16 for
  training): the decoder casts each float32 parameter on use, so gradients land in float32.
* Sharding: the batch is split over ('data', 'fsdp'); parameters and AdamW moments follow
  their logical-axis rules (the moments inherit the parameters' metadata); step and RNG are
  replicated. In/out shardings are explicit; the state is donated.
* A step whose loss or gradient norm is not finite leaves the state unchanged (the host
  then stops; see ``learner.fit``), so a bad update can never reach a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax.core import losses, metrics, returns
from qsharp_jax.core.optim import TrainState
from qsharp_jax.core.sharding import DEFAULT_RULES, named_sharding
from qsharp_jax.guidance.model import GuidanceModel, HeadConfig
from qsharp_jax.models.decoder import positions_from_mask

BATCH_AXES = {
    "tokens": ("batch", "length"),
    "token_mask": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "reward": ("batch",),
    "weight": ("batch",),
}
# packed rows (batching.collate_packed): reward and weight per token, plus segments and positions
PACKED_BATCH_AXES = {
    **{k: ("batch", "length") for k in BATCH_AXES},
    "segment_ids": ("batch", "length"),
    "positions": ("batch", "length"),
}


def _per_token(x: jax.Array, mask: jax.Array) -> jax.Array:
    """A packed per-token array aligned with ``mask`` (Q-type drops the first position)."""
    return x[:, x.shape[1] - mask.shape[1] :]


def packed_loss(out, mask, reward, weight, loss_type: str, **categorical) -> jax.Array:
    """The loss of packed rows: reward / weight are per token, weight = example weight / its
    number of target tokens, so sum_t w_t l_t / sum_t w_t is the weighted mean over examples of
    their mean per-position losses, i.e. ``losses.return_loss`` of the same examples unpacked."""
    b, t = mask.shape
    per_pos = losses.per_position_loss(
        out.reshape(b * t, 1, *out.shape[2:]), reward.reshape(b * t), loss_type, **categorical
    )
    w = jnp.where(mask, weight, 0.0)
    return jnp.sum(per_pos.reshape(b, t) * w) / jnp.maximum(jnp.sum(w), 1e-12)


# ---- forward -----------------------------------------------------------------------


def predictions(model: GuidanceModel, batch) -> tuple[jax.Array, jax.Array]:
    """Head outputs aligned so that ``out[:, t]`` scores (prefix_<t, token_t), and their mask.

    V-type: the head on the hidden state at t itself (one causal forward, spec 3.1).
    Q-type: the head on the hidden state at t-1, read at column token_t (spec 3.2): only the
    needed head columns are gathered, never the [B, T, vocab] tensor. The sequences lose
    their first position, so the mask is the loss mask shifted by one."""
    tokens, token_mask = batch["tokens"], batch["token_mask"]
    if "segment_ids" in batch:  # packed rows: per-example positions, no attention across examples
        h, _ = model.backbone(tokens, batch["positions"], token_mask=token_mask, segment_ids=batch["segment_ids"])
    else:
        h, _ = model.hidden(tokens, positions_from_mask(token_mask), token_mask=token_mask)
    if model.head_cfg.kind == "v":
        return model.head_outputs(h), batch["loss_mask"]
    b, t, e = h.shape
    out = model.q_head_at(h[:, :-1].reshape(b * (t - 1), e), tokens[:, 1:].reshape(b * (t - 1), 1))
    return out.reshape(b, t - 1, *out.shape[2:]), batch["loss_mask"][:, 1:]


def predicted_mean(head: HeadConfig, out: jax.Array) -> jax.Array:
    if head.distribution == "bernoulli":
        return returns.bernoulli_mean(out)
    return returns.categorical_mean(out, head.atom_values())


# ---- the step ----------------------------------------------------------------------


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    head: HeadConfig,
    *,
    loss_type: str = "bce",
    categorical_target: str = "interpolate",
    calibration_bins: int = 10,
) -> Callable:
    """The pure train step for a guidance model of structure ``graphdef``."""
    losses.check_loss_matches_head(loss_type, head.distribution)
    categorical = dict(
        num_atoms=head.num_atoms, v_min=head.v_min, v_max=head.v_max, categorical_mode=categorical_target
    )

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        out, mask = predictions(model, batch)
        if "segment_ids" in batch:
            reward, weight = _per_token(batch["reward"], mask), _per_token(batch["weight"], mask)
            loss = packed_loss(out, mask, reward, weight, loss_type, **categorical)
        else:
            loss = losses.return_loss(out, mask, batch["reward"], batch["weight"], loss_type, **categorical)
        return loss, (out, mask)

    def train_step(state: TrainState, batch):
        (loss, (out, mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            rng=jax.random.split(state.rng)[0],
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Keep the old state on a non-finite step so the host can stop with the last good state.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        pred = jax.lax.stop_gradient(predicted_mean(head, out))
        if "segment_ids" in batch:  # per-token labels: calibrate over [B * T] one-position rows
            real = mask & (_per_token(batch["weight"], mask) > 0)
            b, t = mask.shape
            reward = _per_token(batch["reward"], mask).reshape(b * t)
            calib = metrics.calibration_sums(
                pred.reshape(b * t, 1), reward, real.reshape(b * t, 1), calibration_bins, head.v_min, head.v_max
            )
        else:
            real = mask & (batch["weight"] > 0)[:, None]
            calib = metrics.calibration_sums(pred, batch["reward"], real, calibration_bins, head.v_min, head.v_max)
        stats = dict(
            loss=loss,
            grad_norm=grad_norm,
            lr=schedule(state.step),
            finite=finite,
            tokens=batch["token_mask"].sum(),
            target_tokens=real.sum(),
            calibration=calib,
        )
        return new, stats

    return train_step


# ---- shardings and jit --------------------------------------------------------------


def batch_shardings(mesh: Mesh, batch_size: int, rules: Iterable = DEFAULT_RULES, packed: bool = False) -> dict:
    """Batch rows over ('data', 'fsdp'); fails early if the batch size does not divide."""
    return {
        k: named_sharding(mesh, axes, rules, shape=(batch_size,) + (1,) * (len(axes) - 1), what=f"batch {k}")
        for k, axes in (PACKED_BATCH_AXES if packed else BATCH_AXES).items()
    }
