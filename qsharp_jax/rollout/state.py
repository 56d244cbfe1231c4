"""Types of the rollout engine: the sampler's static config, the typed state carried by
the decode ``while_loop``, and the host-side results.

``DecodeState`` is a registered dataclass, so it is a pytree that ``lax.while_loop``
carries field by field; code reads ``state.done``, never a tuple position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

# "cd_logp" is the star-graph code's CD (spec 1.5 / 8.5): offset log p (FUDGE-style, pi_ref * p)
# and every token outside the k candidates masked, as the authors' star-graph sampler does.
GUIDANCE_KINDS = ("qsharp", "cd", "cd_logp")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    max_new_tokens: int = 256
    k: int = 20  # guidance candidates per step (top-k of the raw reference logits)
    guidance: str = "qsharp"  # "qsharp": ln E[exp(Z/eta)]; "cd": E[Z]/eta; "cd_logp": ln E[Z], top-k only
    stop_ids: tuple = ()  # a row stops after emitting any of these (the stop token is kept)
    pad_id: int = 0  # written after a row stops (and used for left padding)
    prompt_bucket: int = 64  # padded prompt length = a multiple of this (bounds recompiles)
    batch_bucket: int = 1  # padded prompt count = a multiple of this (static engine)
    # Continuous batching: > 0 decodes in this many fixed slots (fewer when a call has fewer
    # rows: the next power of two), refilling slots freed by stopped rows with pending
    # prompts between segments of at most ``segment`` decode steps; 0 = one static batch per call.
    slots: int = 64
    segment: int = 16
    # A refill starts once at least this fraction of the slots is free (or every pending row
    # fits): fewer, larger refills. It starts whole prompts (all n samples, one prefill) when
    # at least n slots are free, so fraction x slots >= n prefills each prompt once. In (0, 1].
    refill_fraction: float = 0.25
    # Decode attention reads the KV cache in blocks of this many columns and skips the
    # blocks no row has a token in yet (or any more) while they are at least a quarter of
    # the cache, so a step costs what the filled part costs, not the capacity (measured on
    # CPU, docs/benchmarks.md); 0 = always attend over every column (masked).
    attention_block: int = 128

    def __post_init__(self):
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance={self.guidance!r} is not one of {GUIDANCE_KINDS}.")
        if self.max_new_tokens < 1 or self.k < 1 or self.prompt_bucket < 1 or self.batch_bucket < 1:
            raise ValueError(f"max_new_tokens, k, prompt_bucket and batch_bucket must be >= 1: {self}")
        if self.attention_block < 0:
            raise ValueError(f"attention_block must be >= 0 (0 = attend over the whole cache): {self}")
        if self.slots < 0 or self.segment < 1:
            raise ValueError(f"slots must be >= 0 and segment >= 1: {self}")
        if not 0.0 < self.refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must be in (0, 1]: {self}")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))


@dataclasses.dataclass
class RolloutBatch:
    """Host (numpy) results; row r continues prompt ``prompt_index[r]``. Per-token arrays are
    [N, max_new_tokens] and hold pad_id / 0 after each row's ``lengths`` (stop token included)."""

    tokens: np.ndarray
    lengths: np.ndarray
    logp_policy: np.ndarray  # log pi(token) under the distribution actually sampled
    logp_ref: np.ndarray  # log pi_ref(token) at the same temperature, untruncated
    kl_token: np.ndarray  # KL(pi || pi_ref) of each step's full next-token distributions
    kl_traj: np.ndarray  # [N] sum of kl_token over the response
    prompt_index: np.ndarray
    steps: int = 0  # decode iterations run (early exit when every row stopped)

    @classmethod
    def from_rows(cls, tokens, lengths, logp_policy, logp_ref, kl_token, *, num_prompts: int, n: int, steps: int):
        """Rows in (prompt, sample) order; the trajectory KL and prompt index follow from them."""
        return cls(
            tokens=tokens,
            lengths=lengths,
            logp_policy=logp_policy,
            logp_ref=logp_ref,
            kl_token=kl_token,
            kl_traj=kl_token.sum(axis=1),
            prompt_index=np.repeat(np.arange(num_prompts), n),
            steps=int(steps),
        )

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about one decode loop (hashable: a jit static argument)."""

    max_new_tokens: int
    k: int
    guidance: str
    guided: bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry. Per-row arrays have N rows; per-token outputs are
    [N, max_new_tokens] and are written at column ``step``."""

    step: jax.Array  # int32 scalar: loop iterations run so far
    ref_cache: Any  # the reference's KVCache
    guide_cache: Any  # the guide backbone's KVCache (None when unguided)
    newest: jax.Array  # [N] int32: the last context token, fed to the next step
    position: jax.Array  # [N] int32: position id of ``newest``
    done: jax.Array  # [N] bool: the row emitted a stop id
    lengths: jax.Array  # [N] int32: tokens generated, stop token included
    keys: jax.Array  # [N] raw PRNG keys ([N, 2] uint32): row r's step i samples with fold_in(keys[r], i)
    tokens: jax.Array  # [N, T] int32 sampled tokens (pad_id after a row stops)
    logp_policy: jax.Array  # [N, T] float32 log pi(token)
    logp_ref: jax.Array  # [N, T] float32 log pi_ref(token)
    kl_token: jax.Array  # [N, T] float32 KL(pi || pi_ref) per step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """The continuous-batching carry: S decode slots, each holding one (prompt, sample) row
    at its own step ``age``. The caches are circular (column = global step mod length);
    a slot's prompt sits in the columns just before the step it was inserted at."""

    ref_cache: Any
    guide_cache: Any
    newest: jax.Array  # [S] int32
    position: jax.Array  # [S] int32
    live: jax.Array  # [S] bool: occupied and still decoding
    age: jax.Array  # [S] int32: decode steps run by the slot's row (its next output column)
    lengths: jax.Array  # [S] int32: tokens generated, stop token included
    keys: jax.Array  # [S, 2] uint32 raw per-row PRNG keys
    tokens: jax.Array  # [S, T] int32
    logp_policy: jax.Array  # [S, T] float32
    logp_ref: jax.Array  # [S, T] float32
    kl_token: jax.Array  # [S, T] float32
