"""What every trainer here shares: the training state pytree, the AdamW optimizer with its
learning-rate schedule, and the state's layout on a mesh.

* Optimizer: optax AdamW (float32 moments) after clip_by_global_norm, with a warmup +
  constant or cosine learning-rate schedule.
* Sharding: parameters and AdamW moments follow their logical-axis rules (the moments
  inherit the parameters' metadata); step and RNG are replicated; the jitted step donates
  the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsharp_jax.core.sharding import DEFAULT_RULES, state_shardings

SCHEDULES = ("constant", "cosine")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # nnx.State of the guidance model's Params (float32 master weights)
    opt_state: Any  # optax state (AdamW moments mirror params)
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    rng: jax.Array  # uint32[2] raw PRNG key, advanced every step


# ---- optimizer -------------------------------------------------------------------


def learning_rate_schedule(
    lr: float, warmup_steps: int, schedule: str, total_steps: int, end_lr_factor: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then constant or cosine decay to
    ``lr * end_lr_factor`` at ``total_steps``."""
    if schedule == "constant":
        if warmup_steps <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
        )
    if schedule == "cosine":
        decay_steps = max(total_steps, warmup_steps + 1)
        if warmup_steps <= 0:
            return optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_factor)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps, end_value=lr * end_lr_factor)
    raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}.")


def make_optimizer(
    schedule: optax.Schedule, *, weight_decay: float, clip: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) (skipped when clip <= 0, as for the authors' Q-type) then AdamW
    (torch defaults; weight decay on every parameter, like torch.optim.AdamW)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def init_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed)
    )


# ---- layout on a mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def train_state_shardings(state: TrainState, mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> TrainState:
    return TrainState(
        params=state_shardings(state.params, mesh, rules),
        opt_state=state_shardings(state.opt_state, mesh, rules),
        step=replicated(mesh),
        rng=replicated(mesh),
    )


def jit_train_step(train_step: Callable, state_sharding: TrainState, batch_sharding: dict, mesh: Mesh) -> Callable:
    """jit with explicit in/out shardings; the input state is donated (updated in place)."""
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )


def place_state(
    params, tx: optax.GradientTransformation, seed: int, mesh: Mesh, rules: Iterable = DEFAULT_RULES
) -> tuple[TrainState, TrainState]:
    """A fresh TrainState laid out on ``mesh`` (params moved, moments created in place), and
    its shardings."""
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx, seed), params)
    sharding = train_state_shardings(abstract, mesh, rules)
    params = jax.device_put(params, sharding.params)
    state = jax.jit(lambda p: init_train_state(p, tx, seed), out_shardings=sharding)(params)
    return state, sharding
