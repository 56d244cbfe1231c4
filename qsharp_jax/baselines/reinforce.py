"""REINFORCE post-training of the policy itself (spec 5.6): online rollouts of the current
policy on prompts with a 0/1 reward, loss mean(-(sum_target log pi) * A), no KL term.

The reward and advantage (``"baseline"``: c - mean c; ``"plus_minus"``: +1 / -0.1) are
:func:`qsharp_jax.policy.losses.reinforce_advantages`. Checkpoints every ``save_every``
steps; a rerun resumes (batch order and sampling keys are functions of the step).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qsharp_jax.checkpoints import training as checkpointing
from qsharp_jax.models.decoder import Decoder
from qsharp_jax.policy.trainer import PolicyTrainer
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig


def sequence_batch(prefixes: np.ndarray, completions: np.ndarray) -> dict:
    """[prefix | completion] rows (equal lengths, no padding) with the loss on the completion."""
    tokens = np.concatenate([prefixes, completions], axis=1).astype(np.int32)
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[:, prefixes.shape[1] :] = True
    return dict(tokens=tokens, token_mask=np.ones(tokens.shape, bool), loss_mask=loss_mask)


def train(
    reference: Decoder,
    prefixes: np.ndarray,
    reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    c: ml_collections.ConfigDict,
    target_len: int,
    checkpoint_dir: str,
    log: Callable[[str], None] = print,
) -> tuple[Decoder, list[dict]]:
    """reward_fn(prompt indices [B], completions [B, target_len]) -> rewards [B] in {0, 1}."""
    trainer = PolicyTrainer(
        nnx.clone(reference), "reinforce", lr=c.lr, total_steps=c.steps, hparams=dict(reward=c.reward),
        warmup_steps=c.warmup_steps, weight_decay=c.weight_decay, clip=c.clip, seed=c.seed,
    )  # fmt: skip
    ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=2, async_save=False)
    position = trainer.restore(ckpt) or {}
    history = list(position.get("history", []))
    start = trainer.step_count
    sampler_cfg = SamplerConfig(max_new_tokens=target_len, prompt_bucket=prefixes.shape[1])
    key = jax.random.key(c.seed)
    window = []
    try:
        for step in tqdm(range(start, c.steps), desc="REINFORCE", initial=start, total=c.steps, file=sys.stderr):
            rng = np.random.default_rng([c.seed, step])
            idx = rng.choice(len(prefixes), size=c.batch_size, replace=False)
            sampler = Sampler(trainer.model, None, sampler_cfg)
            out = sampler.generate(
                prefixes[idx].tolist(), key=jax.random.fold_in(key, step), temperature=c.temperature, top_k=c.top_k
            )
            completions = out.tokens[:, :target_len]
            batch = sequence_batch(prefixes[idx], completions)
            batch["reward"] = reward_fn(idx, completions).astype(np.float32)
            stats = trainer.step(batch)
            window.append(stats["mean_reward"])
            done = step + 1
            if done % c.log_every == 0 or done == c.steps:
                history.append(dict(step=done, mean_reward=float(np.mean(window)), loss=stats["loss"]))
                log(f"REINFORCE step {done}: mean rollout reward {np.mean(window):.3f}")
                window = []
            if done % c.save_every == 0 or done == c.steps:
                trainer.save(ckpt, dict(step=done, history=history), dict(c.to_dict()))
    finally:
        ckpt.close()
    return trainer.model, history
