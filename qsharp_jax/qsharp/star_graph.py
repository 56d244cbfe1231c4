"""Q# on the star-graph task (spec 5.6, Algorithm 1): the V-type Bernoulli classifier.

* :func:`pair_examples`: the offline data of spec 5.6, one example per ground-truth path
  (label 1) and per failed reference sample (label 0), BCE at every target position;
* :func:`build_classifier`: a decoder backbone (any depth / width) whose parameters are
  taken from the trained reference wherever names and shapes match (``init="reference"``),
  drawn fresh (``init="scratch"``), or the first blocks of a pretrained LM with the graph
  vocabulary mapped onto its own tokens (``init="pretrained"``, as the paper starts from
  GPT-2: :func:`pretrained_backbone`), plus a V head;
* :func:`train_classifier`: the guidance learner (:func:`qsharp_jax.guidance.learner.fit`,
  Orbax-resumable) run in chunks with an evaluation after each, which is the learning curve;
* :func:`classifier_metrics`: held-out pair accuracy at the first decision (the only choice
  the shortcut gets wrong) and per-position accuracy (the built-in curriculum: the last
  positions need one hop, earlier ones more);
* :func:`online_examples`: one round of Algorithm 1: roll in with the guided policy to a
  uniform cut, finish with pi_ref, label the whole path (spec 2.1-2.3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from qsharp_jax.checkpoints import loader
from qsharp_jax.config import learner_defaults
from qsharp_jax.guidance import learner
from qsharp_jax.guidance.batching import Example
from qsharp_jax.guidance.model import GuidanceModel, HeadConfig, build as build_guide
from qsharp_jax.models import decoder as model_lib
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.rollout.batched import generate_in_chunks
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig
from qsharp_jax.tasks import star_graph as sg

CLASSIFIER_INITS = ("reference", "scratch", "pretrained")


def pair_examples(prefixes: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> list[Example]:
    """Chosen (ground truth, label 1) and rejected (failed pi_ref sample, label 0) paths."""
    out = []
    for p, c, r in zip(prefixes, chosen, rejected):
        out.append(Example(tuple(int(x) for x in p), tuple(int(x) for x in c), 1.0))
        out.append(Example(tuple(int(x) for x in p), tuple(int(x) for x in r), 0.0))
    return out


def copy_matching(target: model_lib.Decoder, source: model_lib.Decoder) -> list[str]:
    """Copy every parameter of ``source`` into ``target`` whose path and shape match; returns the
    paths copied (so a deeper classifier starts with the reference's layers and fresh extra ones)."""
    graphdef, state = nnx.split(target)
    src = {path: v for path, v in nnx.to_flat_state(nnx.split(source)[1])}
    flat, copied = [], []
    for path, var in nnx.to_flat_state(state):
        s = src.get(path)
        if s is not None and s.get_value().shape == var.get_value().shape:
            var = var.replace(s.get_value())
            copied.append("/".join(str(p) for p in path))
        flat.append((path, var))
    nnx.update(target, nnx.from_flat_state(flat))
    del graphdef
    return copied


def pretrained_token_ids(tokenizer, star: sg.Tokenizer) -> np.ndarray:
    """[star vocab] ids of ``tokenizer`` (a pretrained LM's): for every star-graph token a
    distinct token that the LM reads as one symbol: letters, then letter pairs, for the nodes
    (" A", or "A" where the spaced form is not one token) and the separators themselves. Numbers
    are avoided: BPE vocabularies split them into digits."""
    upper, lower = [chr(c) for c in range(65, 91)], [chr(c) for c in range(97, 123)]
    names = upper + lower + [a + b for a in upper for b in lower]
    taken, ids = set(), []

    def single(text):
        for form in (" " + text, text):
            got = tokenizer.encode(form, add_special_tokens=False)
            if len(got) == 1 and got[0] not in taken:
                return got[0]
        return None

    names = iter(names)
    for _ in range(star.num_nodes):
        for name in names:
            i = single(name)
            if i is not None:
                break
        else:
            raise ValueError(
                f"the pretrained tokenizer has no {star.num_nodes} distinct single-token names for the graph's "
                "nodes: lower graph.num_nodes or use classifier.init='reference'."
            )
        taken.add(i)
        ids.append(i)
    for sep in sg.SEPARATORS:
        i = single(sep)
        if i is None:
            raise ValueError(
                f"separator {sep!r} is not one token of the pretrained tokenizer: use classifier.init='reference'."
            )
        taken.add(i)
        ids.append(i)
    return np.asarray(ids, np.int32)


def pretrained_backbone(path: str, num_layers: int, star: sg.Tokenizer, seed: int) -> model_lib.Decoder:
    """The first ``num_layers`` blocks and final norm of the LM at ``path`` ("" = SmolLM2-135M),
    over the star-graph vocabulary: its embedding rows are the LM's rows of
    :func:`pretrained_token_ids` (an input-only model: the V head replaces the LM head)."""
    loaded = loader.load(path)
    ids = pretrained_token_ids(loaded.tokenizer, star)
    source = model_lib.truncate_layers(loaded.model, num_layers)
    backbone = model_lib.build(source.cfg.replace(vocab_size=star.vocab_size), seed=seed)
    copy_matching(backbone, source)
    backbone.embed.set_value(jnp.asarray(source.embed.get_value())[ids])
    return backbone


def build_classifier(
    reference: model_lib.Decoder,
    cfg: ModelConfig,
    init: str,
    seed: int,
    *,
    star: sg.Tokenizer | None = None,
    pretrained_path: str = "",
) -> GuidanceModel:
    """The V-type Bernoulli classifier; ``cfg`` gives the backbone's shape (with
    ``init="pretrained"`` only its ``num_layers``: the rest is the pretrained LM's)."""
    if init not in CLASSIFIER_INITS:
        raise ValueError(f"classifier init={init!r} is not one of {CLASSIFIER_INITS}.")
    if init == "pretrained":
        if star is None:
            raise ValueError("classifier init='pretrained' needs the star-graph tokenizer (star=...).")
        backbone = pretrained_backbone(pretrained_path, cfg.num_layers, star, seed)
    else:
        backbone = model_lib.build(cfg, seed=seed)
        if init == "reference":
            copy_matching(backbone, reference)
    return build_guide(backbone, HeadConfig(kind="v", distribution="bernoulli", init="normal"), seed=seed)


# ---- evaluation of the classifier -----------------------------------------------------------


def target_logits(guide: GuidanceModel, prefixes: np.ndarray, targets: np.ndarray, chunk: int = 512) -> np.ndarray:
    """[N, target_len] classifier logits at every target position."""
    graphdef, state = nnx.split(guide)
    p = prefixes.shape[1]
    rows = []
    for s in range(0, len(prefixes), chunk):
        tokens = np.concatenate([prefixes[s : s + chunk], targets[s : s + chunk]], axis=1)
        rows.append(np.asarray(_head_logits_static(graphdef)(state, jnp.asarray(tokens)))[:, p:])
    return np.concatenate(rows)


_JITS: dict = {}


def _head_logits_static(graphdef):
    if graphdef not in _JITS:

        @jax.jit
        def run(state, tokens):
            model = nnx.merge(graphdef, state)
            mask = jnp.ones(tokens.shape, bool)
            return model(tokens, model_lib.positions_from_mask(mask), token_mask=mask)[0]

        _JITS[graphdef] = run
    return _JITS[graphdef]


def classifier_metrics(guide: GuidanceModel, prefixes, chosen, rejected) -> dict:
    """Held-out metrics. ``first_decision_pair_acc``: the chosen path's second node scores above
    the rejected one's (only pairs whose rejected path leaves the goal arm at once, i.e. all
    pairs of a shortcut reference). ``position_acc``: per target position, the fraction of
    chosen and rejected rows classified right (logit > 0 iff label 1). ``bce``: mean BCE."""
    lc, lr = target_logits(guide, prefixes, chosen), target_logits(guide, prefixes, rejected)
    first = 2  # target = s , p2 , ... : index 2 holds the first choice
    differs = chosen[:, first] != rejected[:, first]
    pair_acc = float(np.mean(lc[differs, first] > lr[differs, first])) if differs.any() else float("nan")
    pos_acc = 0.5 * (np.mean(lc > 0, axis=0) + np.mean(lr <= 0, axis=0))
    bce = float(np.mean(np.logaddexp(0, -lc)) / 2 + np.mean(np.logaddexp(0, lr)) / 2)
    return dict(first_decision_pair_acc=pair_acc, position_acc=[round(float(a), 4) for a in pos_acc], bce=bce)


# ---- training with a learning curve ---------------------------------------------------------


def learner_config(c: ml_collections.ConfigDict, seq_len: int, checkpoint_dir: str) -> ml_collections.ConfigDict:
    """The learner section for the star-graph classifier (constant lr after warmup, so that
    chunked training equals one uninterrupted run)."""
    cfg = learner_defaults()
    cfg.lr, cfg.warmup_steps, cfg.schedule = c.lr, c.warmup_steps, "constant"
    cfg.weight_decay, cfg.clip = c.weight_decay, c.clip
    cfg.batch_size, cfg.epochs, cfg.max_steps = c.batch_size, 10**6, c.steps
    cfg.buckets, cfg.compute_dtype, cfg.param_dtype = (seq_len,), "float32", "float32"
    cfg.checkpoint_dir, cfg.keep, cfg.save_every, cfg.async_checkpointing = checkpoint_dir, 2, 10**9, False
    cfg.log_every, cfg.seed = c.log_every, c.seed
    cfg.guide.head.update(kind="v", distribution="bernoulli", init="normal")
    return cfg


def train_classifier(
    guide: GuidanceModel,
    examples: Sequence[Example],
    c: ml_collections.ConfigDict,
    seq_len: int,
    out_dir: str,
    evaluate: Callable[[GuidanceModel], dict],
    log: Callable[[str], None] = print,
) -> tuple[GuidanceModel, list[dict]]:
    """Fit ``guide`` for ``c.steps`` steps in chunks of ``c.eval_every``; after each chunk run
    ``evaluate`` and append to the curve (``<out_dir>/curve.json``). Resumes from the learner's
    checkpoints and the saved curve."""
    os.makedirs(out_dir, exist_ok=True)
    curve_path = os.path.join(out_dir, "curve.json")
    curve = []
    if os.path.exists(curve_path):
        with open(curve_path) as f:
            curve = json.load(f)
    cfg = learner_config(c, seq_len, os.path.join(out_dir, "checkpoints"))
    ends = list(range(c.eval_every, c.steps, c.eval_every)) + [c.steps]
    model = None
    for end in ends:
        if curve and curve[-1]["step"] >= end:
            continue
        cfg.max_steps = end
        result = learner.fit(guide, examples, cfg)
        model = result.model
        point = dict(step=end, train_loss=result.history[-1]["loss"] if result.history else None, **evaluate(model))
        curve.append(point)
        with open(curve_path + ".tmp", "w") as f:
            json.dump(curve, f, indent=1)
        os.replace(curve_path + ".tmp", curve_path)
        log(
            f"classifier step {end}: train loss {point['train_loss']}, held-out first-decision pair accuracy "
            f"{point['first_decision_pair_acc']:.3f}, per-position accuracy {point['position_acc']}"
        )
    if model is None:  # every chunk was done already: read the final state back
        model = learner.load_trained_guide(cfg.checkpoint_dir)
    return model, curve


# ---- Algorithm 1, one online round ------------------------------------------------------------


def online_examples(
    reference: model_lib.Decoder,
    guide: GuidanceModel,
    prefixes: np.ndarray,
    targets: np.ndarray,
    *,
    key: jax.Array,
    inv_eta: float,
    top_k: int,
    temperature: float,
    chunk: int = 256,
) -> tuple[list[Example], dict]:
    """Roll in with the guided policy to a cut c ~ Unif{0..L-1}, continue with pi_ref, label
    the whole path by exact match (spec 2.2: the token at the cut is the guided one)."""
    n, length = targets.shape
    p = prefixes.shape[1]
    k_in, k_cut, k_out = jax.random.split(key, 3)
    guided = Sampler(reference, guide, SamplerConfig(max_new_tokens=length, k=top_k, prompt_bucket=p))
    rollin = generate_in_chunks(
        guided, prefixes.tolist(), key=k_in, chunk=chunk, desc="online roll-in",
        temperature=temperature, top_k=top_k, inv_eta=inv_eta,
    ).tokens[:, :length]  # fmt: skip
    cuts = np.asarray(jax.random.randint(k_cut, (n,), 0, length))
    plain = Sampler(reference, None, SamplerConfig(max_new_tokens=length, prompt_bucket=p + length))
    prompts = [list(prefixes[i]) + list(rollin[i, : cuts[i] + 1]) for i in range(n)]
    cont = generate_in_chunks(
        plain, prompts, key=k_out, chunk=chunk, desc="online roll-out", temperature=temperature, top_k=top_k
    ).tokens
    examples, rewards = [], []
    for i in range(n):
        c = int(cuts[i])
        path = list(rollin[i, : c + 1]) + list(cont[i, : length - c - 1])
        r = float(np.array_equal(path, targets[i]))
        rewards.append(r)
        examples.append(Example(tuple(int(x) for x in prefixes[i]) + tuple(int(x) for x in rollin[i, :c]),
                                tuple(int(x) for x in path[c:]), r))  # fmt: skip
    stats = dict(online_examples=n, online_mean_reward=float(np.mean(rewards)),
                 guided_rollin_accuracy=float(np.mean(sg.exact_match(targets, rollin))))  # fmt: skip
    return examples, stats
