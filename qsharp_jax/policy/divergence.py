"""KL of a trained policy to the reference along its own sampled responses, teacher-forced.

The guided sampler measures KL(pi || pi_ref) in the decode loop because pi_ref is the model it
runs; a policy trained in full (REINFORCE, DPO, GRPO) is sampled on its own, so its KL to the
reference is measured afterwards on the same responses, with the same convention as the
sampler's (spec 4.5 / 8.9): per response token, the policy's sampling distribution (temperature,
then top-k, then exact top-p) against the reference's untruncated tempered distribution,
summed over the response.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax.core import sampling
from qsharp_jax.models.decoder import Decoder, forward_logits

_JITS: dict = {}


def _kl_program(policy_graph, reference_graph):
    key = (policy_graph, reference_graph)
    if key not in _JITS:

        def run(ps, rs, tokens, mask, response_mask, temperature, top_p, top_k, prompt_len: int):
            window = slice(prompt_len - 1, tokens.shape[1] - 1)  # logits that predict the response tokens
            lp = forward_logits(nnx.merge(policy_graph, ps), tokens, mask)[:, window]
            lr = forward_logits(nnx.merge(reference_graph, rs), tokens, mask)[:, window]
            b, t, v = lp.shape
            lp, lr = lp.reshape(b * t, v), lr.reshape(b * t, v)
            tempered = sampling.reference_log_probs(lp, temperature)
            log_pi = sampling.policy_log_probs(lp, tempered, temperature, top_p, top_k)
            kl = sampling.kl_divergence(log_pi, sampling.reference_log_probs(lr, temperature)).reshape(b, t)
            return jnp.sum(jnp.where(response_mask, kl, 0.0), axis=1)

        _JITS[key] = jax.jit(run, static_argnames=("prompt_len",))
    return _JITS[key]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def trajectory_kl(
    policy: Decoder,
    reference: Decoder,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    pad_id: int = 0,
    rows_per_call: int = 8,
    bucket: int = 32,
) -> np.ndarray:
    """[N] sum over each response's tokens of KL(policy as sampled || pi_ref untruncated), for
    ``responses[i]`` continuing ``prompts[i]`` (an empty response has KL 0). Rows are laid out
    ``[pad | prompt | response | pad]``; lengths are bucketed to bound recompiles and
    ``rows_per_call`` bounds the [rows, length, vocab] logits in memory."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    if not prompts:
        return np.zeros((0,), np.float32)
    pg, ps = nnx.split(policy)
    rg, rs = nnx.split(reference)
    run = _kl_program(pg, rg)
    p_len = _round_up(max(len(p) for p in prompts), bucket)
    r_len = _round_up(max(max(len(r) for r in responses), 1), bucket)
    out = np.zeros((len(prompts),), np.float32)
    for start in range(0, len(prompts), rows_per_call):
        rows = range(start, min(start + rows_per_call, len(prompts)))
        tokens = np.full((rows_per_call, p_len + r_len), pad_id, np.int32)
        mask = np.zeros(tokens.shape, bool)
        response_mask = np.zeros((rows_per_call, r_len), bool)
        for j, i in enumerate(rows):
            p, r = list(prompts[i]), list(responses[i])
            tokens[j, p_len - len(p) : p_len + len(r)] = p + r
            mask[j, p_len - len(p) : p_len + len(r)] = True
            response_mask[j, : len(r)] = True
        kl = run(
            ps, rs, tokens, mask, response_mask, np.float32(temperature), np.float32(top_p), np.int32(top_k),
            prompt_len=p_len,
        )  # fmt: skip
        out[start : rows.stop] = np.asarray(kl)[: len(rows)]
    return out
