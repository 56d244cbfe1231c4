"""Train a decoder (the policy itself) with any registered :mod:`~qsharp_jax.policy.losses` loss.

``make_train_step`` is the pure ``(TrainState, batch) -> (TrainState, stats)`` step (AdamW
from :mod:`qsharp_jax.core.optim`; a non-finite step leaves the state unchanged).
:class:`PolicyTrainer` lays the state out on a mesh, jits the step with explicit shardings
(batch rows over ('data', 'fsdp'), state donated), and saves / restores Orbax checkpoints
(the state plus a JSON position), so a killed run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax.checkpoints import training as checkpointing
from qsharp_jax.core import optim
from qsharp_jax.core.sharding import DEFAULT_RULES, make_mesh, named_sharding
from qsharp_jax.models.decoder import Decoder
from qsharp_jax.policy import losses


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, loss: str, hparams: Mapping):
    spec = losses.get(loss)
    hparams = dict(hparams)

    def loss_fn(params, batch):
        return spec.fn(nnx.merge(graphdef, params), batch, hparams)

    def train_step(state: optim.TrainState, batch):
        (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = optim.TrainState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            rng=jax.random.split(state.rng)[0],
        )
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, dict(loss=value, grad_norm=grad_norm, lr=schedule(state.step), finite=finite, **stats)

    return train_step


class PolicyTrainer:
    """A decoder under training: ``trainer.step(host_batch) -> stats`` (host floats),
    ``trainer.model`` (the current decoder), ``save`` / ``restore`` (Orbax)."""

    def __init__(
        self,
        model: Decoder,
        loss: str,
        *,
        lr: float,
        total_steps: int,
        hparams: Mapping | None = None,
        warmup_steps: int = 0,
        schedule: str = "constant",
        end_lr_factor: float = 0.0,
        weight_decay: float = 0.1,
        clip: float = 1.0,
        seed: int = 0,
        mesh: Mesh | None = None,
        rules=DEFAULT_RULES,
    ):
        self.loss, self.rules = loss, tuple(rules)
        self.batch_keys = losses.get(loss).batch_keys
        self.mesh = make_mesh(data=1, fsdp=-1, tensor=1) if mesh is None else mesh
        self.schedule = optim.learning_rate_schedule(lr, warmup_steps, schedule, total_steps, end_lr_factor)
        tx = optim.make_optimizer(self.schedule, weight_decay=weight_decay, clip=clip)
        self.graphdef, params = nnx.split(model)
        step_fn = make_train_step(self.graphdef, tx, self.schedule, loss, hparams or {})
        with jax.set_mesh(self.mesh):
            self.state, self.state_sharding = optim.place_state(params, tx, seed, self.mesh, self.rules)
        self._step_fn, self._jitted = step_fn, {}

    def _batch_sharding(self, batch: Mapping) -> dict:
        return {
            k: named_sharding(self.mesh, ("batch",) + (None,) * (np.ndim(v) - 1), self.rules, np.shape(v), f"batch {k}")
            for k, v in batch.items()
        }

    def step(self, host_batch: Mapping) -> dict:
        batch = {k: np.asarray(host_batch[k]) for k in self.batch_keys}
        key = tuple((k, v.shape, v.dtype.str) for k, v in batch.items())
        if key not in self._jitted:
            self._jitted[key] = (
                optim.jit_train_step(self._step_fn, self.state_sharding, self._batch_sharding(batch), self.mesh),
                self._batch_sharding(batch),
            )
        train, shardings = self._jitted[key]
        with jax.set_mesh(self.mesh):
            self.state, stats = train(self.state, {k: jax.device_put(v, shardings[k]) for k, v in batch.items()})
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        if not stats["finite"]:
            raise FloatingPointError(f"non-finite {self.loss} loss {stats['loss']} at step {self.step_count}.")
        return stats

    @property
    def step_count(self) -> int:
        return int(jax.device_get(self.state.step))

    @property
    def model(self) -> Decoder:
        return nnx.merge(self.graphdef, self.state.params)

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, ckpt: checkpointing.Checkpointer, position: dict, config: dict) -> None:
        ckpt.save(self.state, dict(position), dict(config))

    def restore(self, ckpt: checkpointing.Checkpointer) -> dict | None:
        """Restore the latest checkpoint if any; returns its saved position (None if none)."""
        if ckpt.latest_step() is None:
            return None
        abstract = jax.eval_shape(lambda s: s, self.state)
        with jax.set_mesh(self.mesh):
            self.state, position, _ = ckpt.restore(checkpointing.restore_target(abstract, self.state_sharding))
        return position
