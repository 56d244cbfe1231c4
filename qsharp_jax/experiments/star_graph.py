"""The star-graph experiment (spec section 5), one resumable job.

Phases, each writing under ``cfg.output_dir`` and skipped when already done:

1. ``data/``: the pretrain / posttrain / test splits (JSONL, written once).
2. ``pretrain/``: pi_ref from scratch, next-token loss on the target only (spec 5.4); Orbax
   checkpoints; ``pretrain/metrics.json`` holds the shortcut diagnosis (teacher-forced
   accuracy at the first decision vs every other target token).
3. ``pairs.npz``: for every post-train graph, pi_ref samples (temperature 1, no top-k) until
   a wrong path (spec 5.5); graphs where pi_ref never failed are dropped.
4. the methods, each evaluated on the test graphs (sampling, top-k 10, temperature 1,
   exact match of the path; CD and Q# with eta = 0.1), results in ``results/<method>.json``:
   pretrained; REINFORCE, DPO, RPO, GRPO (the policy is trained); CD and Q# (one V-type Bernoulli
   classifier on the pairs, two offset formulas: ln p and ln(p e^{1/eta} + 1 - p)); Q# online
   (one more Algorithm 1 round: roll-in with the Q# policy, pi_ref roll-out, aggregated data,
   classifier retrained from the same initialisation).
5. ``results.json``, ``table.txt`` and ``accuracy.png`` (bar chart like the paper's Fig. 2(b)).

Mean KL to the reference: per test graph, the sum over the path's steps of KL(policy step
distribution as sampled, i.e. after top-k, || pi_ref at the same temperature, untruncated),
then the mean over graphs.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qsharp_jax.baselines import grpo, preference, reinforce
from qsharp_jax.checkpoints import training as checkpointing
from qsharp_jax.experiments import star_graph_report as report
from qsharp_jax.models import decoder as model_lib
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.policy import divergence
from qsharp_jax.policy.trainer import PolicyTrainer
from qsharp_jax.qsharp import star_graph as qsg
from qsharp_jax.rollout.batched import generate_in_chunks
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig
from qsharp_jax.tasks import star_graph as sg

METHODS = ("pretrained", "reinforce", "dpo", "rpo", "grpo", "cd", "qsharp", "qsharp_online")


class ConfigError(ValueError):
    pass


def _log(message: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    bad = []
    try:
        sg.GraphSpec(cfg.graph.degree, cfg.graph.path_len, cfg.graph.num_nodes)
    except sg.StarGraphError as e:
        bad.append(f"graph: {e}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        bad.append(f"methods: {unknown} not in {METHODS}")
    if "qsharp_online" in cfg.methods and "qsharp" not in cfg.methods:
        bad.append("methods: qsharp_online needs qsharp (its first round)")
    if cfg.data.heldout >= cfg.data.posttrain:
        bad.append(f"data.heldout={cfg.data.heldout} must be below data.posttrain={cfg.data.posttrain}")
    if cfg.eval.top_k < 1 or cfg.eval.eta <= 0:
        bad.append("eval.top_k must be >= 1 and eval.eta > 0")
    if cfg.classifier.init not in qsg.CLASSIFIER_INITS:
        bad.append(f"classifier.init={cfg.classifier.init!r} not in {qsg.CLASSIFIER_INITS}")
    for sec in ("pretrain", "classifier", "reinforce", "dpo", "rpo"):
        if cfg[sec].steps < 1 or cfg[sec].batch_size < 1 or cfg[sec].lr <= 0:
            bad.append(f"{sec}: steps, batch_size and lr must be positive")
    pretrained = cfg.classifier.init == "pretrained"  # its width and heads are the pretrained LM's
    if cfg.model.hidden_size % cfg.model.num_heads or (
        not pretrained and cfg.classifier.hidden_size % cfg.classifier.num_heads
    ):
        bad.append("model/classifier hidden_size must be a multiple of num_heads")
    if "grpo" in cfg.methods:
        try:
            grpo.validate_grpo_config(cfg.grpo)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ConfigError("; ".join(bad))


def decoder_config(vocab_size: int, seq_len: int, m) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_heads,
        head_dim=m.hidden_size // m.num_heads,
        rope_theta=float(m.get("rope_theta", 10_000.0)),
        max_position_embeddings=seq_len,
    )


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# ---- jitted helpers -------------------------------------------------------------------------------

_JITS: dict = {}


def _cached(name, graphdef, make):
    key = (name, graphdef)
    if key not in _JITS:
        _JITS[key] = make()
    return _JITS[key]


def teacher_forced_stats(model, prefixes, targets, chunk=1000) -> dict:
    """Argmax accuracy of every target token given the true prefix (teacher forcing)."""
    graphdef, state = nnx.split(model)

    def make():
        @jax.jit
        def run(state, tokens):
            m = nnx.merge(graphdef, state)
            logits = model_lib.forward_logits(m, tokens, jnp.ones(tokens.shape, bool))
            return jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]

        return run

    run = _cached("tf", graphdef, make)
    p = prefixes.shape[1]
    hits = np.concatenate(
        [np.asarray(run(state, np.concatenate([prefixes[s : s + chunk], targets[s : s + chunk]], 1)))[:, p - 1 :]
         for s in range(0, len(prefixes), chunk)]
    )  # fmt: skip  # [N, target_len]: hit of each target token
    first = 2  # target = s , p2 , ...: index 2 is the first choice
    others = np.delete(hits, first, axis=1)
    return dict(
        token_acc=float(hits.mean()),
        first_decision_acc=float(hits[:, first].mean()),
        other_tokens_acc=float(others.mean()),
        path_acc=float(hits.all(axis=1).mean()),
        per_position_acc=[round(float(a), 4) for a in hits.mean(axis=0)],
    )


def policy_kl(policy, reference, prefixes, completions, temperature, top_k) -> np.ndarray:
    """[N] sum over the completion's steps of KL(policy after top-k || pi_ref), teacher-forced."""
    return divergence.trajectory_kl(
        policy, reference, prefixes.tolist(), completions.tolist(), temperature=temperature, top_k=top_k,
        rows_per_call=500, bucket=1,
    )  # fmt: skip


def pair_stats(pairs: dict) -> dict:
    """What pi_ref's failed samples look like. ``rejected_ends_at_goal``: the failed path still
    writes the goal as its last node (the shortcut copies it from the prefix instead of following
    the wrong arm's edges), so a value classifier cannot tell a failure by its end node alone."""
    goal = pairs["prefixes"][:, -2]  # the prefix ends with  / s , g =
    rejected = pairs["rejected"]
    if not len(rejected):  # pi_ref never failed within max_tries
        return dict(pairs=0, mean_tries=None, first_decision_differs=None, rejected_ends_at_goal=None)
    return dict(
        pairs=len(rejected),
        mean_tries=float(np.mean(pairs["tries"])),
        first_decision_differs=float(np.mean(pairs["chosen"][:, 2] != rejected[:, 2])),
        rejected_ends_at_goal=float(np.mean(rejected[:, -1] == goal)),
    )


# ---- the run ------------------------------------------------------------------------------------


class StarGraphRun:
    def __init__(self, cfg: ml_collections.ConfigDict):
        validate_config(cfg)
        self.cfg = cfg
        self.out = os.path.abspath(cfg.output_dir)
        os.makedirs(self.out, exist_ok=True)
        self.spec = sg.GraphSpec(cfg.graph.degree, cfg.graph.path_len, cfg.graph.num_nodes)
        self.tok = sg.Tokenizer(self.spec.num_nodes)
        self.seq_len = self.spec.prefix_len + self.spec.target_len
        self.timings = _read_json(self._p("timings.json")) if os.path.exists(self._p("timings.json")) else {}
        with open(self._p("config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))

    def _p(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def _timed(self, name, fn):
        """Run ``fn`` and add its wall time to ``timings.json`` under ``name`` (re-read first, so
        two processes running disjoint method subsets in one output_dir keep each other's entries)."""
        t = time.time()
        value = fn()
        path = self._p("timings.json")
        self.timings = _read_json(path) if os.path.exists(path) else {}
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t
        report.write_json(path, self.timings)
        return value

    # -- data ---------------------------------------------------------------------------------
    def load_data(self):
        c = self.cfg.data
        sizes = dict(pretrain=c.pretrain, posttrain=c.posttrain, test=c.test)
        splits = sg.load_or_write_splits(self._p("data"), self.spec, sizes, self.cfg.seed)
        self.arrays = {s: sg.encode_split(self.tok, g) for s, g in splits.items()}
        _log(
            f"G({self.spec.degree},{self.spec.path_len}) with {self.spec.num_nodes} nodes: prefix "
            f"{self.spec.prefix_len} + target {self.spec.target_len} tokens; splits {sizes}"
        )

    # -- reference --------------------------------------------------------------------------
    def reference_config(self) -> ModelConfig:
        return decoder_config(self.tok.vocab_size, self.seq_len, self.cfg.model)

    def pretrain(self) -> model_lib.Decoder:
        c = self.cfg.pretrain
        model = model_lib.build(self.reference_config(), seed=c.seed)
        trainer = PolicyTrainer(
            model, "next_token", lr=c.lr, total_steps=c.steps, warmup_steps=c.warmup_steps, schedule="cosine",
            end_lr_factor=c.end_lr_factor, weight_decay=c.weight_decay, clip=c.clip, seed=c.seed,
        )  # fmt: skip
        ckpt = checkpointing.Checkpointer(self._p("pretrain", "checkpoints"), keep=2, async_save=False)
        position = trainer.restore(ckpt) or {}
        history = list(position.get("history", []))
        start = trainer.step_count
        prefixes, targets = self.arrays["pretrain"]
        n = len(prefixes)
        per_epoch = n // c.batch_size
        window = []
        t0 = time.time()
        try:
            for step in tqdm(range(start, c.steps), desc="pretrain", initial=start, total=c.steps, file=sys.stderr):
                epoch, pos = divmod(step, per_epoch)
                order = np.random.default_rng([c.seed, epoch]).permutation(n)
                idx = order[pos * c.batch_size : (pos + 1) * c.batch_size]
                window.append(trainer.step(reinforce.sequence_batch(prefixes[idx], targets[idx]))["loss"])
                done = step + 1
                if done % c.log_every == 0 or done == c.steps:
                    tf = teacher_forced_stats(trainer.model, *(a[:1000] for a in self.arrays["test"]))
                    point = dict(step=done, loss=float(np.mean(window)), seconds=round(time.time() - t0, 1), **tf)
                    point.pop("per_position_acc")
                    history.append(point)
                    _log(
                        f"pretrain step {done}: loss {point['loss']:.3f} (ln {self.spec.degree}/"
                        f"{self.spec.target_len} = {np.log(self.spec.degree) / self.spec.target_len:.3f} is the "
                        f"shortcut's floor); teacher-forced on test: first decision {tf['first_decision_acc']:.3f}, "
                        f"other tokens {tf['other_tokens_acc']:.3f}"
                    )
                    window = []
                if done % c.save_every == 0 or done == c.steps:
                    trainer.save(ckpt, dict(step=done, history=history), {})
        finally:
            ckpt.close()
        model = trainer.model
        metrics_path = self._p("pretrain", "metrics.json")
        if not os.path.exists(metrics_path):
            metrics = dict(
                history=history,
                teacher_forced_train=teacher_forced_stats(model, *(a[:2000] for a in self.arrays["pretrain"])),
                teacher_forced_test=teacher_forced_stats(model, *self.arrays["test"]),
            )
            report.write_json(metrics_path, metrics)
            tr, te = metrics["teacher_forced_train"], metrics["teacher_forced_test"]
            _log(
                f"reference: teacher-forced token accuracy train {tr['token_acc']:.3f} / test {te['token_acc']:.3f}; "
                f"all tokens but the first decision {tr['other_tokens_acc']:.3f} / {te['other_tokens_acc']:.3f}; "
                f"first decision {tr['first_decision_acc']:.3f} / {te['first_decision_acc']:.3f}"
            )
        return model

    # -- pairs --------------------------------------------------------------------------------
    def collect_pairs(self, reference) -> dict:
        path = self._p("pairs.npz")
        if os.path.exists(path):
            return dict(np.load(path))
        c = self.cfg.collect
        prefixes, targets = self.arrays["posttrain"]
        sampler = Sampler(
            reference, None, SamplerConfig(max_new_tokens=self.spec.target_len, prompt_bucket=prefixes.shape[1])
        )
        n, L = targets.shape
        rejected = np.full((n, L), -1, np.int32)
        tries = np.zeros(n, np.int32)
        key = jax.random.key(self.cfg.seed)
        rounds = -(-c.max_tries // c.samples_per_round)
        for r in range(rounds):
            todo = np.flatnonzero(rejected[:, 0] < 0)
            if len(todo) == 0:
                break
            out = generate_in_chunks(
                sampler, prefixes[todo].tolist(), key=jax.random.fold_in(key, r), chunk=c.chunk,
                n=c.samples_per_round, desc=f"pairs round {r + 1}/{rounds}", temperature=c.temperature,
            )  # fmt: skip
            samples = out.tokens[:, :L].reshape(len(todo), c.samples_per_round, L)
            wrong = ~np.all(samples == targets[todo][:, None], axis=-1)
            for j, i in enumerate(todo):
                hit = np.flatnonzero(wrong[j])
                if len(hit):
                    rejected[i] = samples[j, hit[0]]
                    tries[i] += hit[0] + 1
                else:
                    tries[i] += c.samples_per_round
        keep = rejected[:, 0] >= 0
        pairs = dict(
            prefixes=prefixes[keep], chosen=targets[keep], rejected=rejected[keep], tries=tries[keep],
            graph_index=np.flatnonzero(keep),
        )  # fmt: skip
        np.savez(path, **pairs)
        st = pair_stats(pairs)
        detail = (
            f" (mean tries {st['mean_tries']:.2f}); first decision wrong in {st['first_decision_differs']:.3f} of "
            f"the failed samples, which still end at the goal in {st['rejected_ends_at_goal']:.3f}"
            if st["pairs"]
            else ""
        )
        _log(f"pairs: {keep.sum()} of {n} post-train graphs gave a failed pi_ref sample in {c.max_tries} tries{detail}")
        return pairs

    def split_pairs(self, pairs):
        """(training pairs, held-out pairs): pairs of the last data.heldout post-train graphs are held out."""
        held = pairs["graph_index"] >= len(self.arrays["posttrain"][0]) - self.cfg.data.heldout
        return {k: v[~held] for k, v in pairs.items()}, {k: v[held] for k, v in pairs.items()}

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, name, reference, policy=None, guide=None, guidance="qsharp") -> dict:
        path = self._p("results", f"{name}.json")
        if os.path.exists(path):
            return _read_json(path)
        e = self.cfg.eval
        prefixes, targets = self.arrays["test"]
        t = time.time()
        model = reference if policy is None else policy
        scfg = SamplerConfig(
            max_new_tokens=self.spec.target_len, k=e.top_k, guidance=guidance, prompt_bucket=prefixes.shape[1]
        )
        sampler = Sampler(model, guide, scfg)
        out = generate_in_chunks(
            sampler, prefixes.tolist(), key=jax.random.key(e.seed), chunk=e.chunk, desc=f"evaluate {name}",
            temperature=e.temperature, top_k=e.top_k, inv_eta=1.0 / e.eta,
        )  # fmt: skip
        completions = out.tokens[:, : self.spec.target_len]
        correct = sg.exact_match(targets, completions)
        if policy is None:  # pi_ref itself, or guided: the sampler's KL is against pi_ref
            kl = out.kl_traj
        else:
            kl = policy_kl(policy, reference, prefixes, completions, e.temperature, e.top_k)
        first_ok = completions[:, 2] == targets[:, 2]
        result = dict(
            accuracy=float(correct.mean()),
            first_decision_accuracy=float(first_ok.mean()),
            # after a right first choice, did the rest of the path follow the edges correctly?
            accuracy_given_first_right=float(correct[first_ok].mean()) if first_ok.any() else float("nan"),
            mean_kl=float(np.mean(kl)),
            n=len(targets),
            seconds=round(time.time() - t, 1),
        )
        report.write_json(path, result)
        _log(f"{name}: test accuracy {result['accuracy']:.3f}, mean KL {result['mean_kl']:.3f}")
        return result

    # -- classifier -------------------------------------------------------------------------------
    def classifier_model_config(self) -> ModelConfig:
        return decoder_config(self.tok.vocab_size, self.seq_len, self.cfg.classifier)

    def train_classifier(self, reference, examples, held, subdir: str, steps: int | None = None, start=None):
        """Train (or resume) a classifier under ``subdir``: from ``classifier.init``, or from a copy
        of the classifier ``start`` (the online round's warm start)."""
        c = self.cfg.classifier.copy_and_resolve_references()
        if steps:
            c.steps = steps
        if start is not None:
            guide = nnx.clone(start)
        else:
            guide = qsg.build_classifier(
                reference, self.classifier_model_config(), c.init, c.seed, star=self.tok,
                pretrained_path=c.pretrained_path,
            )  # fmt: skip
        evaluate = lambda g: qsg.classifier_metrics(g, held["prefixes"], held["chosen"], held["rejected"])
        return qsg.train_classifier(guide, examples, c, self.seq_len, self._p(subdir), evaluate, _log)


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Run (or resume) the whole experiment; returns {method: result}."""
    r = StarGraphRun(cfg)
    start = time.time()
    r._timed("data", r.load_data)
    reference = r._timed("pretrain", r.pretrain)
    results = {}
    methods = list(cfg.methods)
    if "pretrained" in methods:
        results["pretrained"] = r._timed("eval_pretrained", lambda: r.evaluate("pretrained", reference))
    needs_pairs = any(m in methods for m in ("dpo", "rpo", "cd", "qsharp", "qsharp_online"))
    pairs = r._timed("collect_pairs", lambda: r.collect_pairs(reference)) if needs_pairs else None
    train_pairs, held = r.split_pairs(pairs) if pairs is not None else (None, None)
    prefixes, targets = r.arrays["posttrain"]
    post_n = len(prefixes) - cfg.data.heldout

    guide = None
    if any(m in methods for m in ("cd", "qsharp", "qsharp_online")):
        examples = qsg.pair_examples(train_pairs["prefixes"], train_pairs["chosen"], train_pairs["rejected"])
        guide, _ = r._timed("classifier", lambda: r.train_classifier(reference, examples, held, "classifier"))
        if "cd" in methods:
            results["cd"] = r._timed("eval_cd", lambda: r.evaluate("cd", reference, guide=guide, guidance="cd_logp"))
        if "qsharp" in methods:
            results["qsharp"] = r._timed("eval_qsharp", lambda: r.evaluate("qsharp", reference, guide=guide))
    if "reinforce" in methods:

        def do_reinforce():
            if os.path.exists(r._p("results", "reinforce.json")):
                return r.evaluate("reinforce", reference)
            reward = lambda idx, comp: sg.exact_match(targets[idx], comp)
            policy, hist = reinforce.train(
                reference, prefixes[:post_n], reward, cfg.reinforce, r.spec.target_len,
                r._p("reinforce", "checkpoints"), _log,
            )  # fmt: skip
            report.write_json(r._p("reinforce", "history.json"), hist)
            return r.evaluate("reinforce", reference, policy=policy)

        results["reinforce"] = r._timed("reinforce", do_reinforce)
    if "grpo" in methods:

        def do_grpo():
            if os.path.exists(r._p("results", "grpo.json")):
                return r.evaluate("grpo", reference)
            reward = lambda idx, out: sg.exact_match(targets[idx], out.tokens[:, : r.spec.target_len])
            scfg = SamplerConfig(max_new_tokens=r.spec.target_len, prompt_bucket=prefixes.shape[1])
            policy, record = grpo.train(
                nnx.clone(reference), reference, prefixes[:post_n].tolist(), reward, cfg.grpo, scfg,
                r._p("grpo", "checkpoints"), _log,
            )  # fmt: skip
            report.write_json(r._p("grpo", "history.json"), record)
            return r.evaluate("grpo", reference, policy=policy)

        results["grpo"] = r._timed("grpo", do_grpo)
    for loss in ("dpo", "rpo"):
        if loss in methods:

            def do_pref(loss=loss):
                if os.path.exists(r._p("results", f"{loss}.json")):
                    return r.evaluate(loss, reference)
                policy, hist = preference.train(
                    reference, train_pairs["prefixes"], train_pairs["chosen"], train_pairs["rejected"], loss,
                    cfg[loss], r._p(loss, "checkpoints"), _log,
                )  # fmt: skip
                report.write_json(r._p(loss, "history.json"), hist)
                return r.evaluate(loss, reference, policy=policy)

            results[loss] = r._timed(loss, do_pref)

    if "qsharp_online" in methods:

        def do_online():
            if os.path.exists(r._p("results", "qsharp_online.json")):
                return r.evaluate("qsharp_online", reference)
            online_path = r._p("online", "examples.json")
            if os.path.exists(online_path):
                saved = _read_json(online_path)
                online, stats = (
                    [qsg.Example(tuple(a), tuple(b), c) for a, b, c in saved["examples"]],
                    saved["stats"],
                )
            else:
                n_online = min(cfg.online.graphs, post_n)
                online, stats = qsg.online_examples(
                    reference, guide, prefixes[:n_online], targets[:n_online],
                    key=jax.random.key(cfg.seed + 1), inv_eta=1.0 / cfg.eval.eta, top_k=cfg.eval.top_k,
                    temperature=cfg.eval.temperature, chunk=cfg.eval.chunk,
                )  # fmt: skip
                report.write_json(
                    online_path,
                    dict(stats=stats, examples=[(list(e.input_ids), list(e.target_ids), e.reward) for e in online]),
                )
            _log(f"online round: {stats}")
            steps = cfg.online.get("classifier_steps", 0) or cfg.classifier.steps
            start = guide if cfg.online.get("warm_start", False) else None
            guide2, _ = r.train_classifier(reference, examples + online, held, "classifier_online", steps, start)
            return r.evaluate("qsharp_online", reference, guide=guide2)

        results["qsharp_online"] = r._timed("qsharp_online", do_online)

    results = {m: results[m] for m in METHODS if m in results}  # the table's order
    degree = r.spec.degree
    pre = _read_json(r._p("pretrain", "metrics.json"))
    curve_path = r._p("classifier", "curve.json")
    payload = dict(
        preset=cfg.preset,
        graph=dict(degree=degree, path_len=r.spec.path_len, num_nodes=r.spec.num_nodes),
        results=results,
        reference=dict(
            teacher_forced_train=pre["teacher_forced_train"], teacher_forced_test=pre["teacher_forced_test"]
        ),
        pairs=pair_stats(pairs) if pairs is not None else None,
        pretrain_curve=pre["history"],
        classifier_curve=_read_json(curve_path) if os.path.exists(curve_path) else None,
        classifier_online_curve=(
            _read_json(r._p("classifier_online", "curve.json"))
            if os.path.exists(r._p("classifier_online", "curve.json"))
            else None
        ),
        timings_s={k: round(v, 1) for k, v in r.timings.items()},
        wall_time_this_call_s=round(time.time() - start, 1),
        config=json.loads(cfg.to_json_best_effort()),
    )
    report.write_json(r._p("results.json"), payload)
    text = report.table(results, degree)
    with open(r._p("table.txt"), "w") as f:
        f.write(text + "\n")
    if results:
        n_test = len(r.arrays["test"][0])
        title = f"Star graph G({degree},{r.spec.path_len}), {r.spec.num_nodes} nodes, {n_test} test graphs"
        report.bar_chart(r._p("accuracy.png"), results, title, degree)
        curves = {}
        for name in ("classifier", "classifier_online"):
            path = r._p(name, "curve.json")
            curves[name] = _read_json(path) if os.path.exists(path) else None
        online_curve, round1 = curves.pop("classifier_online"), curves["classifier"]
        if online_curve and cfg.online.get("warm_start", False) and round1:  # it continues round 1's steps
            base = round1[-1]["step"]
            curves["classifier_online (warm start)"] = [dict(p, step=p["step"] + base) for p in online_curve]
        else:
            curves["classifier_online"] = online_curve
        report.curves_chart(r._p("curves.png"), pre["history"], curves, title, degree)
    print(text)
    return results
