"""GRPO post-training of the policy itself (Shao et al. 2024), on the library's rollout engine
and policy train step.

Each batch: ``prompts_per_step`` prompts, ``group_size`` samples each from the current policy
(the continuous-batching sampler; its per-row keys make a batch a function of the step),
rewards from ``reward_fn``, advantages normalised within each prompt's group
(:func:`qsharp_jax.policy.losses.grpo_advantages`), then ``mu`` updates of the clipped
objective with the k3 KL to the frozen reference (:func:`qsharp_jax.policy.losses.grpo_loss`).
Training stops after ``steps`` batches or once ``token_budget`` response tokens were sampled.
Orbax checkpoints every ``save_every`` batches hold the state and the position (batch, sampled
tokens, history, wall time); a rerun resumes there and ends identical to an uninterrupted run;
SIGTERM saves first.

Where this departs from the paper: the loss's log-probs are those of the tempered,
untruncated policy even when rollouts use top-p / top-k (as TRL); the group std has Bessel's
correction (as TRL); with ``mu = 1`` the old policy is the current one, so the ratio is 1 at
the update and the clip never binds (the paper's mu is a free parameter; 1 is TRL's default).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qsharp_jax.checkpoints import training as checkpointing
from qsharp_jax.models.decoder import Decoder
from qsharp_jax.policy import losses
from qsharp_jax.policy.trainer import PolicyTrainer
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import RolloutBatch, SamplerConfig

RewardFn = Callable[[np.ndarray, RolloutBatch], np.ndarray]  # (prompt indices [B], rollouts) -> rewards [B]


def validate_grpo_config(c: ml_collections.ConfigDict, section: str = "grpo") -> None:
    """Every knob in its range, or one error naming each bad key and its valid range."""
    bad = []

    def need(ok, key, rule):
        if not ok:
            bad.append(f"{section}.{key}={c[key]!r}: {rule}")

    need(c.steps >= 1, "steps", "must be >= 1")
    need(c.token_budget >= -1, "token_budget", "must be >= 0 (0 = no budget; -1 = the Q# collection's, job only)")
    need(c.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    need(c.group_size >= 2, "group_size", "must be >= 2 (advantages are relative to the group)")
    need(c.mu >= 1, "mu", "must be >= 1")
    need(c.lr > 0, "lr", "must be > 0")
    need(c.beta >= 0, "beta", "must be >= 0")
    need(0 < c.clip_eps < 1, "clip_eps", "must be in (0, 1)")
    need(c.eps > 0, "eps", "must be > 0")
    need(c.aggregation in losses.GRPO_AGGREGATIONS, "aggregation", f"must be one of {losses.GRPO_AGGREGATIONS}")
    need(c.temperature > 0, "temperature", "must be > 0")
    need(0 < c.top_p <= 1, "top_p", "must be in (0, 1]")
    need(c.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
    need(c.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(c.clip >= 0, "clip", "must be >= 0 (0 = off)")
    need(c.log_every >= 1, "log_every", "must be >= 1")
    need(c.save_every >= 1, "save_every", "must be >= 1")
    if bad:
        raise ValueError("invalid GRPO config: " + "; ".join(bad))


LENGTH_BUCKET = 16  # batch rows are rounded up to a multiple of this: few shapes to compile


def batch_length(longest_row: int, window: int, cap: int) -> int:
    """Row length of a training batch: its longest prompt + completion rounded up to
    :data:`LENGTH_BUCKET`, at least ``window + 1`` (the log-prob window and the token before it)
    and at most ``cap`` (the longest prompt + max_new_tokens). Short answers make short rows:
    the forward / backward pass costs what the batch holds, not the sampler's cap."""
    bucketed = -(-longest_row // LENGTH_BUCKET) * LENGTH_BUCKET
    return min(cap, max(window + 1, bucketed))


def sequence_batch(prompts: list, completions: list, length: int, pad_id: int = 0) -> dict:
    """Rows ``[pad | prompt | completion]`` left-padded to ``length`` tokens, the loss on the
    completion (stop token included)."""
    n = len(prompts)
    tokens = np.full((n, length), pad_id, np.int32)
    token_mask = np.zeros((n, length), bool)
    loss_mask = np.zeros((n, length), bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        if len(row) > length:
            raise ValueError(f"row {i}: {len(row)} tokens exceed the batch length {length}.")
        tokens[i, length - len(row) :] = row
        token_mask[i, length - len(row) :] = True
        loss_mask[i, length - len(c) :] = True
    return dict(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask)


_LOGPROB_JITS: dict = {}


def token_log_probs(model: Decoder, batch: dict, temperature: float, last: int) -> np.ndarray:
    """[B, T] log-probs of the batch's last ``last`` tokens under ``model`` at ``temperature``
    (0 before them; no gradient)."""
    graphdef, state = nnx.split(model)
    key = (graphdef, last)
    if key not in _LOGPROB_JITS:
        _LOGPROB_JITS[key] = jax.jit(
            lambda s, t, m, temp: losses.model_token_log_probs(nnx.merge(graphdef, s), t, m, temp, last)
        )
    return np.asarray(_LOGPROB_JITS[key](state, batch["tokens"], batch["token_mask"], jnp.float32(temperature)))


def train(
    policy: Decoder,
    reference: Decoder,
    prompts: list,
    reward_fn: RewardFn,
    c: ml_collections.ConfigDict,
    sampler_config: SamplerConfig,
    checkpoint_dir: str,
    log: Callable[[str], None] = print,
    desc: str = "GRPO",
) -> tuple[Decoder, dict]:
    """Train ``policy`` (a copy of the reference, updated in full) with GRPO on ``prompts``
    (token-id lists). Returns the trained policy and the run record: ``history`` (one entry per
    ``log_every`` batches), ``batches``, ``optimizer_steps``, ``sampled_tokens``, ``seconds``."""
    validate_grpo_config(c)
    if c.token_budget < 0:
        raise ValueError("grpo.token_budget=-1 must be resolved to a token count before training.")
    if c.prompts_per_step > len(prompts):
        raise ValueError(f"grpo.prompts_per_step={c.prompts_per_step} exceeds the {len(prompts)} training prompts.")
    max_new = sampler_config.max_new_tokens
    length = max(len(p) for p in prompts) + max_new
    hparams = dict(
        temperature=float(c.temperature), clip_eps=float(c.clip_eps), beta=float(c.beta),
        aggregation=c.aggregation, max_response_tokens=max_new, response_window=max_new, on_policy=c.mu == 1,
    )  # fmt: skip
    policy.remat = bool(c.remat)  # the backward pass of a full fine-tune holds every block's activations otherwise
    trainer = PolicyTrainer(
        policy, "grpo", lr=c.lr, total_steps=c.steps * c.mu, hparams=hparams, warmup_steps=c.warmup_steps,
        weight_decay=c.weight_decay, clip=c.clip, seed=c.seed,
    )  # fmt: skip
    ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=2, async_save=False)
    position = trainer.restore(ckpt) or {}
    record = dict(
        history=list(position.get("history", [])),
        batches=int(position.get("batches", 0)),
        sampled_tokens=int(position.get("sampled_tokens", 0)),
        seconds=float(position.get("seconds", 0.0)),
    )
    key = jax.random.key(c.seed)
    window: list[dict] = []

    def finished() -> bool:
        return record["batches"] >= c.steps or (c.token_budget > 0 and record["sampled_tokens"] >= c.token_budget)

    def save():
        record["optimizer_steps"] = trainer.step_count
        trainer.save(ckpt, dict(record), dict(c.to_dict()))

    bar = tqdm(desc=desc, total=c.steps, initial=record["batches"], unit="batch", file=sys.stderr)
    try:
        with checkpointing.SigtermGuard() as guard:
            while not finished():
                t0, step = time.time(), record["batches"]
                rng = np.random.default_rng([c.seed, step])
                idx = rng.choice(len(prompts), size=c.prompts_per_step, replace=False)
                chosen = [prompts[i] for i in idx]
                out = Sampler(trainer.model, None, sampler_config).generate(
                    chosen, key=jax.random.fold_in(key, step), n=c.group_size, temperature=c.temperature,
                    top_p=c.top_p, top_k=c.top_k,
                )  # fmt: skip
                row_prompt = idx[out.prompt_index]
                rewards = np.asarray(reward_fn(row_prompt, out), np.float32)
                rows, completions = [prompts[i] for i in row_prompt], out.completions()
                longest = max(len(p) + len(x) for p, x in zip(rows, completions))
                batch = sequence_batch(rows, completions, batch_length(longest, max_new, length), sampler_config.pad_id)
                batch["advantage"] = np.asarray(
                    losses.grpo_advantages(jnp.asarray(rewards), c.group_size, c.eps, c.std_normalize)
                )
                batch["ref_logp"] = token_log_probs(reference, batch, c.temperature, max_new)
                batch["old_logp"] = (
                    np.zeros_like(batch["ref_logp"])  # mu = 1: the loss takes the current log-probs as old
                    if c.mu == 1
                    else token_log_probs(trainer.model, batch, c.temperature, max_new)
                )
                for _ in range(c.mu):
                    stats = trainer.step(batch)
                record["batches"] = step + 1
                record["sampled_tokens"] += int(np.sum(out.lengths))
                record["seconds"] += time.time() - t0
                window.append(dict(reward=float(rewards.mean()), loss=stats["loss"], kl=stats["kl"],
                                   clip_fraction=stats["clip_fraction"]))  # fmt: skip
                bar.update(1)
                bar.set_postfix(reward=f"{window[-1]['reward']:.3f}", kl=f"{stats['kl']:.4f}")
                if record["batches"] % c.log_every == 0 or finished():
                    point = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    point.update(batch=record["batches"], sampled_tokens=record["sampled_tokens"],
                                 seconds=round(record["seconds"], 1))  # fmt: skip
                    record["history"].append(point)
                    log(
                        f"{desc} batch {record['batches']}: mean reward {point['reward']:.3f}, "
                        f"k3 KL {point['kl']:.4f}, {record['sampled_tokens']} tokens sampled"
                    )
                    window = []
                saved_now = record["batches"] % c.save_every == 0 or finished()
                if saved_now:
                    save()
                if guard.requested:
                    if not saved_now:  # a SIGTERM right after a periodic save: that checkpoint is this batch
                        save()
                    raise checkpointing.Preempted(record["batches"], ckpt.directory)
    finally:
        bar.close()
        ckpt.close()
    record["optimizer_steps"] = trainer.step_count
    return trainer.model, record
