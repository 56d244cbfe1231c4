"""Training checkpoints: Orbax ``CheckpointManager`` (async, keep-N) of the guidance
training state, and the SIGTERM guard that makes preemption save before exiting.

A checkpoint step holds three items:

* ``state``: the :class:`~qsharp_jax.core.optim.TrainState` (trained params, AdamW state,
  step, RNG key), restored straight onto the run's shardings;
* ``data``: the data-iterator position (epoch, position in epoch) and what identifies the
  data (seed, batches per epoch, dataset fingerprint), as JSON;
* ``config``: the effective config, as JSON.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest one. The frozen reference model
is never saved here (design decision 6).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from qsharp_jax.core.optim import TrainState

CONFIG_FILE = "effective_config.json"


class Preempted(SystemExit):
    """Raised after a SIGTERM-triggered save; exits with 128 + SIGTERM like an unhandled signal."""

    def __init__(self, step: int, directory: str):
        super().__init__(128 + signal.SIGTERM)
        self.step, self.directory = step, directory

    def __str__(self):
        return f"preempted by SIGTERM: saved step {self.step} in {self.directory}; rerun the same command to resume."


def _as_dict(state: TrainState) -> dict:
    # Shallow on purpose: dataclasses.asdict would deep-copy and unwrap the nnx Variables.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, data: dict, config: dict) -> None:
        """Start saving ``state`` at its step (returns once the arrays are copied off device)."""
        step = int(jax.device_get(state.step))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_dict(state)),
                data=ocp.args.JsonSave(data),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """(state, data position, config) of ``step`` (default: the latest). ``abstract_state``
        holds ShapeDtypeStructs with shardings: where the arrays go."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_as_dict(abstract_state)),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return TrainState(**out.state), dict(out.data), dict(out.config)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_target(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the shardings to restore onto (``shardings`` may stop at
    parameter Variables, so pair the two trees leaf by leaf)."""
    leaves = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        for a, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings))
    ]
    return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)


def write_config(directory: str, config: dict) -> None:
    """The effective config beside the checkpoints, readable without Orbax."""
    os.makedirs(directory, exist_ok=True)
    # every host of a multi-host slice writes the same file into a shared directory: one temp
    # file each, so each rename is atomic and none removes another's
    tmp = os.path.join(directory, f"{CONFIG_FILE}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


class SigtermGuard:
    """Context manager: while active, SIGTERM only sets ``requested``; the training loop saves
    and then raises :class:`Preempted`. Outside the main thread (where handlers cannot be
    installed) it is inert."""

    def __init__(self):
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False
