"""DPO and RPO post-training of the policy on (chosen, rejected) completions (spec 5.6).

The frozen reference's sequence log-probs are computed once; batches are a permutation of
the pairs per epoch (a function of seed and epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qsharp_jax.baselines.reinforce import sequence_batch
from qsharp_jax.checkpoints import training as checkpointing
from qsharp_jax.models.decoder import Decoder
from qsharp_jax.policy import losses
from qsharp_jax.policy.trainer import PolicyTrainer

_JITS: dict = {}


def sequence_log_probs(model: Decoder, prefixes: np.ndarray, completions: np.ndarray, chunk: int = 512) -> np.ndarray:
    """[N] sum of log pi(completion token) under ``model`` (teacher-forced)."""
    graphdef, state = nnx.split(model)
    if graphdef not in _JITS:

        @jax.jit
        def run(state, tokens, loss_mask):
            m = nnx.merge(graphdef, state)
            lp = losses.model_token_log_probs(m, tokens, jnp.ones(tokens.shape, bool))
            return losses.sequence_log_probs(lp, loss_mask)

        _JITS[graphdef] = run
    out = []
    for s in range(0, len(prefixes), chunk):
        b = sequence_batch(prefixes[s : s + chunk], completions[s : s + chunk])
        out.append(np.asarray(_JITS[graphdef](state, b["tokens"], b["loss_mask"])))
    return np.concatenate(out)


def train(
    reference: Decoder,
    prefixes: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    loss: str,
    c: ml_collections.ConfigDict,
    checkpoint_dir: str,
    log: Callable[[str], None] = print,
) -> tuple[Decoder, list[dict]]:
    """``loss`` is "dpo" or "rpo" (hparams beta, and alpha for RPO, from ``c``)."""
    if loss not in ("dpo", "rpo"):
        raise ValueError(f"preference loss {loss!r} is not 'dpo' or 'rpo'.")
    ref_c = sequence_log_probs(reference, prefixes, chosen)
    ref_r = sequence_log_probs(reference, prefixes, rejected)
    hp = dict(beta=c.beta, alpha=c.get("alpha", 1.0))
    trainer = PolicyTrainer(
        nnx.clone(reference), loss, lr=c.lr, total_steps=c.steps, hparams=hp, warmup_steps=c.warmup_steps,
        weight_decay=c.weight_decay, clip=c.clip, seed=c.seed,
    )  # fmt: skip
    ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=2, async_save=False)
    position = trainer.restore(ckpt) or {}
    history = list(position.get("history", []))
    start = trainer.step_count
    per_epoch = len(prefixes) // c.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(prefixes)} pairs are fewer than one batch ({c.batch_size}).")
    name = loss.upper()
    try:
        for step in tqdm(range(start, c.steps), desc=name, initial=start, total=c.steps, file=sys.stderr):
            epoch, pos = divmod(step, per_epoch)
            order = np.random.default_rng([c.seed, epoch]).permutation(len(prefixes))
            idx = order[pos * c.batch_size : (pos + 1) * c.batch_size]
            bc, br = sequence_batch(prefixes[idx], chosen[idx]), sequence_batch(prefixes[idx], rejected[idx])
            batch = {f"chosen_{k}": v for k, v in bc.items()} | {f"rejected_{k}": v for k, v in br.items()}
            batch.update(ref_chosen_logp=ref_c[idx], ref_rejected_logp=ref_r[idx])
            stats = trainer.step(batch)
            done = step + 1
            if done % c.log_every == 0 or done == c.steps:
                point = dict(step=done, **{k: stats[k] for k in ("loss", "chosen_logp", "rejected_logp")})
                history.append(point)
                log(
                    f"{name} step {done}: loss {stats['loss']:.4f}, chosen log-prob {stats['chosen_logp']:.3f}, "
                    f"rejected log-prob {stats['rejected_logp']:.3f}"
                )
            if done % c.save_every == 0 or done == c.steps:
                trainer.save(ckpt, dict(step=done, history=history), dict(c.to_dict()))
    finally:
        ckpt.close()
    return trainer.model, history
