"""The guidance model: a decoder backbone plus a small head predicting the distribution
of the reward-to-go Z(x, y) under the reference policy (spec section 3).

* V-type: head on the hidden state of the position holding token y (the sequence ends
  in y): ``[E] -> 1`` (Bernoulli logit) or ``[E] -> num_atoms`` (categorical logits).
* Q-type: head on the hidden state *before* y, one output per vocabulary entry:
  ``[E] -> [V, 1 or num_atoms]``; at decode time only the k candidate columns are computed.

The backbone is any :class:`qsharp_jax.models.decoder.Decoder`; its own LM head is dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qsharp_jax.core import returns
from qsharp_jax.models.decoder import Decoder, KVCache

KINDS = ("v", "q")
DISTRIBUTIONS = ("bernoulli", "categorical")
INITS = ("zero", "normal", "reuse")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    kind: str = "v"  # "v" or "q"
    distribution: str = "bernoulli"  # "bernoulli" (BCE or MSE losses) or "categorical"
    num_atoms: int = 11
    v_min: float = 0.0
    v_max: float = 1.0
    init: str = "normal"  # "zero", "normal" (N(0, 0.02)), or "reuse" (Q-type: copy the LM head)

    def __post_init__(self):
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("distribution", self.distribution, DISTRIBUTIONS),
            ("init", self.init, INITS),
        ):
            if value not in allowed:
                raise ValueError(f"guidance head {name}={value!r} is not one of {allowed}.")
        if self.init == "reuse" and self.kind != "q":
            raise ValueError(
                "guidance head init='reuse' copies the LM head and needs kind='q'; "
                "use init='normal' or 'zero' for a V-type head."
            )
        if self.distribution == "categorical" and (self.num_atoms < 2 or self.v_max <= self.v_min):
            raise ValueError(
                f"categorical head needs num_atoms >= 2 and v_max > v_min, got "
                f"num_atoms={self.num_atoms}, [{self.v_min}, {self.v_max}]."
            )

    @property
    def out_dim(self) -> int:
        return 1 if self.distribution == "bernoulli" else self.num_atoms

    def atom_values(self) -> jax.Array:
        return returns.atoms(self.num_atoms, self.v_min, self.v_max)


class GuidanceModel(nnx.Module):
    def __init__(self, backbone: Decoder, head: HeadConfig, *, rngs: nnx.Rngs):
        cfg = backbone.cfg
        self.backbone = backbone
        self.head_cfg = head
        e, a = cfg.hidden_size, head.out_dim
        if head.kind == "v":
            shape, axes = (e, a), ("embed", "atoms")
        else:
            shape, axes = (e, cfg.vocab_size, a), ("embed", "vocab", "atoms")
        if head.init == "zero":
            w = jnp.zeros(shape, jnp.float32)
        elif head.init == "normal":
            w = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
        else:  # reuse: every atom column starts as the LM head, so the initial pmf is uniform
            w = jnp.broadcast_to(backbone.lm_head_kernel().astype(jnp.float32)[..., None], shape)
        param_dtype = backbone.embed.get_value().dtype
        self.head = nnx.Param(w.astype(param_dtype), out_sharding=axes, eager_sharding=False)
        if not cfg.tie_word_embeddings and hasattr(backbone, "lm_head"):
            del backbone.lm_head  # the head replaces the LM head (Q-type may start as a copy of it)

    @property
    def cfg(self):
        return self.backbone.cfg

    def hidden(self, tokens, positions, *, token_mask=None, cache: KVCache | None = None, n_write=None):
        """Backbone final hidden states [B, T, E] (and cache)."""
        return self.backbone(tokens, positions, token_mask=token_mask, cache=cache, n_write=n_write)

    def head_outputs(self, h: jax.Array) -> jax.Array:
        """Head on hidden states [..., E]. V: [...] (Bernoulli) or [..., A]; Q: [..., V] or [..., V, A].
        float32."""
        w = self.head.get_value().astype(h.dtype)
        if self.head_cfg.kind == "v":
            out = jnp.einsum("...e,ea->...a", h, w, preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("...e,eva->...va", h, w, preferred_element_type=jnp.float32)
        return out[..., 0] if self.head_cfg.out_dim == 1 else out

    def q_head_at(self, h: jax.Array, idx: jax.Array) -> jax.Array:
        """Q-type outputs at vocabulary columns ``idx`` only. h: [B, E], idx: [B, k] ->
        [B, k] (Bernoulli) or [B, k, A]. Only k columns of the head are touched."""
        w = jnp.take(self.head.get_value(), idx, axis=1).astype(h.dtype)  # [E, B, k, A]
        out = jnp.einsum("be,ebka->bka", h, w, preferred_element_type=jnp.float32)
        return out[..., 0] if self.head_cfg.out_dim == 1 else out

    def __call__(self, tokens, positions, *, token_mask=None, cache: KVCache | None = None, n_write=None):
        h, cache = self.hidden(tokens, positions, token_mask=token_mask, cache=cache, n_write=n_write)
        return self.head_outputs(h), cache

    # ---- statistics of the predicted Z (elementwise over head outputs) ----------

    def log_mgf(self, out: jax.Array, inv_eta) -> jax.Array:
        """ln E[exp(z/eta)] per prediction: the Q#/eta logit offset before any shift."""
        if self.head_cfg.distribution == "bernoulli":
            return returns.bernoulli_log_mgf(out, inv_eta)
        return returns.categorical_log_mgf(out, self.head_cfg.atom_values(), inv_eta)

    def mean(self, out: jax.Array) -> jax.Array:
        if self.head_cfg.distribution == "bernoulli":
            return returns.bernoulli_mean(out)
        return returns.categorical_mean(out, self.head_cfg.atom_values())

    def variance(self, out: jax.Array) -> jax.Array:
        if self.head_cfg.distribution == "bernoulli":
            return returns.bernoulli_variance(out)
        return returns.categorical_variance(out, self.head_cfg.atom_values())


def build(backbone: Decoder, head: HeadConfig, seed: int = 0) -> GuidanceModel:
    return GuidanceModel(backbone, head, rngs=nnx.Rngs(seed))
