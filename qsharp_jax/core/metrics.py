"""Training metrics: calibration of the predicted success probability, explained variance,
and the writer that sends scalars to TensorBoard event files and stdout (tqdm bar).

Calibration is per position: every target position's predicted mean E[Z] (a success
probability for binary rewards) is one point, binned uniformly on [v_min, v_max]. The
jitted train step returns only fixed-size sums (:func:`calibration_sums`), which the host
adds up between log steps and turns into a reliability table, ECE and explained variance.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def calibration_sums(
    pred_mean: jax.Array, rewards: jax.Array, mask: jax.Array, num_bins: int, v_min: float = 0.0, v_max: float = 1.0
) -> dict[str, jax.Array]:
    """Fixed-size sufficient statistics over the masked positions (jittable).

    pred_mean: [B, T] predicted E[Z]; rewards: [B] (the label of every position in its row);
    mask: [B, T] (float or bool)."""
    m = mask.astype(jnp.float32)
    p = pred_mean.astype(jnp.float32)
    r = jnp.broadcast_to(rewards.astype(jnp.float32)[:, None], p.shape)
    unit = jnp.clip((p - v_min) / (v_max - v_min), 0.0, 1.0)
    bins = jnp.minimum((unit * num_bins).astype(jnp.int32), num_bins - 1)
    onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32) * m[..., None]
    res = r - p
    return dict(
        bin_count=onehot.sum((0, 1)),
        bin_pred=(onehot * p[..., None]).sum((0, 1)),
        bin_label=(onehot * r[..., None]).sum((0, 1)),
        n=m.sum(),
        label_sum=(m * r).sum(),
        label_sq=(m * r * r).sum(),
        res_sum=(m * res).sum(),
        res_sq=(m * res * res).sum(),
    )


def add_sums(total: dict | None, new: Mapping) -> dict:
    new = {k: np.asarray(v, np.float64) for k, v in new.items()}
    return new if total is None else {k: total[k] + new[k] for k in total}


def summarize_calibration(sums: Mapping) -> dict:
    """ECE, explained variance, and the reliability table (per bin: count, mean predicted,
    empirical mean label)."""
    count = np.asarray(sums["bin_count"])
    safe = np.maximum(count, 1e-12)
    mean_pred, empirical = sums["bin_pred"] / safe, sums["bin_label"] / safe
    n = max(float(sums["n"]), 1e-12)
    ece = float(np.sum(count * np.abs(mean_pred - empirical)) / n)
    var_label = sums["label_sq"] / n - (sums["label_sum"] / n) ** 2
    var_res = sums["res_sq"] / n - (sums["res_sum"] / n) ** 2
    explained = float(1.0 - var_res / var_label) if var_label > 1e-12 else float("nan")
    return dict(
        ece=ece,
        explained_variance=explained,
        reliability=[
            dict(count=int(c), mean_pred=float(p), empirical=float(e)) for c, p, e in zip(count, mean_pred, empirical)
        ],
    )


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed (only for torch-tensor inputs, which we never pass), and torch must stay off
    the main path (design decision 8; it also costs seconds of import time)."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes tensorboardX's optional `import torch` fail fast
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


class MetricsWriter:
    """Scalars to TensorBoard (``logdir``; None disables) and a tqdm progress bar on stdout."""

    def __init__(
        self,
        logdir: str | None,
        total_steps: int,
        initial_step: int = 0,
        disable_bar: bool = False,
        quiet: bool = False,
    ):
        """quiet: no bar, no step lines, no TensorBoard (the processes other than 0 of a multi-host run)."""
        from tqdm.auto import tqdm

        self.quiet = quiet
        logdir, disable_bar = (None, True) if quiet else (logdir, disable_bar)
        self.writer = _summary_writer(logdir) if logdir else None
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            disable=disable_bar,
            file=sys.stdout,
        )

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if self.writer is not None:
            for k, v in values.items():
                if np.isfinite(v):  # e.g. explained variance is undefined on constant labels
                    self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "ece", "lr", "tokens_per_s")}
        self.bar.set_postfix(shown, refresh=False)
        if not self.quiet:
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.5g}" for k, v in values.items()))

    def reliability(self, step: int, table, prefix: str = "calibration") -> None:
        if self.writer is None:
            return
        for i, row in enumerate(table):
            if row["count"]:
                self.writer.add_scalars(
                    f"{prefix}/bin_{i:02d}", {"mean_pred": row["mean_pred"], "empirical": row["empirical"]}, step
                )

    def text(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
