"""The Q# loop (Algorithm 1, spec 2) over a math-word-problem task.

Per iteration k = 1..K:

1. collect rollouts with the current policy (k = 1: pi_ref alone; later: pi_ref guided by
   the guide of iteration k-1 at ``collect.rollin_inv_eta``); shards of problems whose
   rollouts are already saved are read back instead;
2. aggregate all iterations' rollouts and build classifier examples;
3. train the guidance model from scratch on them (learner checkpoints resume);
4. evaluate pi_ref guided by the new guide at ``eval.inv_eta`` on the evaluation problems
   (pass@1, maj1@n, pass@n, KL), next to the unguided pi_ref baseline.

Everything lands in ``output_dir``: the effective config (``config.json``), rollouts per
iteration and shard (``rollouts/``), guide checkpoints per iteration (``guide/``, or under
``learner.checkpoint_dir`` when set), metrics and graded samples per policy (``eval/``) and
``summary.json``. A restarted job reuses all finished pieces.
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
from tqdm import tqdm

from qsharp_jax.checkpoints import loader
from qsharp_jax.core import multihost, sharding
from qsharp_jax.distributed import planner, topologies
from qsharp_jax.guidance import learner as learner_lib, scoring
from qsharp_jax.policy import divergence
from qsharp_jax.qsharp import collect, evaluation, report
from qsharp_jax.qsharp.job_config import ConfigError, model_path, save_effective_config, validate_config
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig
from qsharp_jax.tasks import catalog, data

# ---- the job ----------------------------------------------------------------------------------


def _take(problems, count):
    return problems if count == -1 else problems[:count]


def _log(message: str) -> None:
    if not multihost.is_main():  # multi-host: process 0 logs
        return
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def _progress(desc: str):
    return lambda items: tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=not multihost.is_main())


# Multi-host: process 0 writes the job's record into its output directory (which may be its own
# disk); whether a piece is saved and what it holds are process 0's, sent to every process.
def _exists(path: str) -> bool:
    return multihost.agree(os.path.exists(path))


def _read_json(path: str):
    return json.loads(multihost.read_text(path))


def _write_json(path: str, value) -> None:
    if not multihost.is_main():  # every process holds the same (gathered) results; one writes
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class QSharpRun:
    """State of one job: config, mesh, reference model, tokenizer, task, problems, output paths."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.out = os.path.abspath(cfg.output_dir)
        self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self.key = jax.random.key(cfg.seed)
        t = time.time()
        self.reference = loader.load(
            model_path(cfg.reference.path), dtype=getattr(jnp, cfg.reference.dtype), mesh=self.mesh
        )
        self.tokenizer = self.reference.tokenizer
        if self.tokenizer is None:
            raise ConfigError(
                f"reference.path={cfg.reference.path!r} has no tokenizer: the prompts need its chat "
                "template (convert it with its tokenizer files)."
            )
        _log(
            f"reference model loaded in {time.time() - t:.0f}s ({self.reference.config.num_params() / 1e6:.0f}M "
            f"params, mesh {dict(self.mesh.shape)})"
        )
        self.check_guide_tokenizer()
        self.task = catalog.from_config(cfg)
        d = cfg.data
        self.train_problems = _take(self.task.train_problems(), d.num_train_problems)
        self.eval_problems = _take(self.task.eval_problems(d.eval_split), d.num_eval_problems)
        self.train_prompts = self.task.encode_prompts(self.tokenizer, self.train_problems)
        self.eval_prompts = self.task.encode_prompts(self.tokenizer, self.eval_problems)
        self.guides: dict[int, object] = {}  # iteration -> trained guide, loaded on demand
        _log(
            f"task {cfg.task}: {len(self.train_problems)} training problems, {len(self.eval_problems)} evaluation "
            f"problems ({d.eval_split})"
        )

    def check_guide_tokenizer(self) -> None:
        """Fail now, not after the first collection, if the guide cannot read the reference's ids."""
        guide_path = model_path(self.cfg.learner.guide.path)
        if guide_path == model_path(self.cfg.reference.path):
            return  # the same model: same tokenizer
        guide_tokenizer = loader.load_tokenizer(guide_path)
        if guide_tokenizer is None:
            raise ConfigError(
                f"learner.guide.path={self.cfg.learner.guide.path!r} has no tokenizer to check "
                "against the reference's: convert it with its tokenizer files."
            )
        learner_lib.check_same_tokenizer(
            guide_tokenizer, self.tokenizer, guide_path or "SmolLM2", self.cfg.reference.path or "SmolLM2"
        )

    # -- pieces ---------------------------------------------------------------------------
    def stop_ids(self) -> tuple:
        stop = set(self.reference.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(stop))

    def sampler(self, guide=None, guidance: str | None = None, model=None):
        """The configured sampler of ``model`` (default the reference), optionally guided."""
        s = self.cfg.sampler
        pad = self.tokenizer.pad_token_id
        config = SamplerConfig(
            max_new_tokens=s.max_new_tokens,
            k=s.k,
            guidance=guidance or s.guidance,
            stop_ids=self.stop_ids(),
            pad_id=int(pad if pad is not None else 0),
            prompt_bucket=s.prompt_bucket,
            batch_bucket=s.problems_per_batch,
        )  # fixed batch shapes: fewer compiles
        return Sampler(self.reference.model if model is None else model, guide, config, mesh=self.mesh)

    def num_shards(self) -> int:
        return -(-len(self.train_problems) // self.cfg.collect.problems_per_shard)

    def rollouts_saved(self, iteration: int) -> bool:
        return multihost.agree(
            all(os.path.exists(collect.rollouts_path(self.out, iteration, s)) for s in range(self.num_shards()))
        )

    def rollouts(self, iteration: int, guide) -> list[collect.Rollout]:
        """This iteration's rollouts: shards saved by an earlier run are read back, the others
        collected now and saved one by one (a killed job loses at most one shard)."""
        c, s = self.cfg.collect, self.cfg.sampler
        guided = iteration > 1
        sampler = None
        rollouts, reused, t = [], 0, time.time()
        for shard in range(self.num_shards()):
            path = collect.rollouts_path(self.out, iteration, shard)
            if _exists(path):
                part = collect.load_rollouts(path, multihost.read_text(path))
                reused += len(part)
            else:
                sampler = sampler or self.sampler(guide if guided else None)
                lo, hi = shard * c.problems_per_shard, (shard + 1) * c.problems_per_shard
                problems = self.train_problems[lo:hi]
                part = collect.collect_iteration(
                    sampler,
                    self.tokenizer,
                    self.train_prompts[lo:hi],
                    [p.question for p in problems],
                    [p.answer for p in problems],
                    iteration=iteration,
                    num_samples=c.samples_per_problem,
                    key=jax.random.fold_in(self.key, 1),
                    guided=guided,
                    inv_eta=c.rollin_inv_eta if guided else 0.0,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    grader=self.task.grader,
                    seed=self.cfg.seed,
                    shard=shard,
                    problems_per_batch=s.problems_per_batch,
                    progress=_progress(f"collect {iteration} shard {shard + 1}/{self.num_shards()}"),
                )
                if multihost.is_main():  # every process holds the shard's (gathered) rollouts
                    collect.save_rollouts(path, part)
            rollouts += part
        correct = sum(r.response_correct for r in rollouts) / max(len(rollouts), 1)
        mean_reward = sum(r.reward for r in rollouts) / max(len(rollouts), 1)
        _log(
            f"iteration {iteration}: {len(rollouts)} rollouts ({reused} read back) in {time.time() - t:.0f}s; "
            f"{'guided' if guided else 'pi_ref'} roll-in accuracy {correct:.3f}, mean reward {mean_reward:.3f}"
        )
        return rollouts

    def checkpoint_dir(self, iteration: int) -> str:
        base = self.cfg.learner.checkpoint_dir or os.path.join(self.out, "guide")
        return os.path.join(os.path.abspath(base), f"iteration_{iteration}")

    def train_guide(self, iteration: int, rollouts: list[collect.Rollout]):
        """A guide trained from scratch on the aggregated rollouts (resumes its checkpoint).

        The rollouts of a seeded ``collect.heldout_fraction`` of the training problems are held
        out of training (spec 2.3); the guide's calibration on them is saved per iteration."""
        c = self.cfg.collect
        held = set()
        if c.heldout_fraction > 0:
            held = {
                p.question
                for p in self.train_problems
                if data.split_of(p.question, self.cfg.seed + 1, c.heldout_fraction) == "validation"
            }
        train_rollouts = [r for r in rollouts if r.question not in held]
        examples = collect.create_classifier_data(
            train_rollouts,
            drop_no_variation=c.drop_no_variation,
            use_all_ref_tokens=c.use_all_ref_tokens,
            max_length=c.max_length,
        )
        if not examples:
            raise RuntimeError(
                f"iteration {iteration}: no training examples are left from {len(train_rollouts)} rollouts: every "
                "problem got the same reward on all its samples and collect.drop_no_variation drops such problems. "
                "Collect more (collect.samples_per_problem, data.num_train_problems, sampler.max_new_tokens) or set "
                "collect.drop_no_variation=False."
            )
        lcfg = self.cfg.learner.copy_and_resolve_references()
        with lcfg.unlocked():
            lcfg.checkpoint_dir = self.checkpoint_dir(iteration)
        t = time.time()
        guide, _ = learner_lib.build_guidance_model(lcfg, self.mesh, reference_tokenizer=self.tokenizer)
        result = learner_lib.fit(guide, examples, lcfg, mesh=self.mesh)
        _log(
            f"iteration {iteration}: guide trained on {len(examples)} examples "
            f"({sum(e.reward for e in examples) / len(examples):.3f} positive), {result.steps_run} steps run in "
            f"{time.time() - t:.0f}s, checkpoints in {lcfg.checkpoint_dir}"
        )
        heldout = collect.create_classifier_data(
            [r for r in rollouts if r.question in held],
            drop_no_variation=False,
            use_all_ref_tokens=c.use_all_ref_tokens,
            max_length=c.max_length,
        )
        if heldout:
            calib = scoring.calibration(result.model, heldout, pad_id=int(self.cfg.learner.pad_id))
            _write_json(os.path.join(self.out, "eval", f"calibration_iter{iteration}.json"), calib)
            _log(
                f"iteration {iteration}: held-out calibration on {calib['examples']} examples of {len(held)} problems: "
                f"bce {calib['bce']:.3f}, ece {calib['ece']:.3f}, explained variance {calib['explained_variance']:.3f}"
            )
        return result.model

    def guide(self, iteration: int):
        """The guide of ``iteration``: trained in this process, or read back from its checkpoint."""
        if iteration not in self.guides:
            self.guides[iteration] = learner_lib.load_trained_guide(self.checkpoint_dir(iteration), mesh=self.mesh)
        return self.guides[iteration]

    def evaluate(
        self,
        name: str,
        guide=None,
        *,
        guidance: str = "qsharp",
        inv_eta: float | None = None,
        policy=None,
        method: str | None = None,
    ) -> dict:
        """Metrics of pi_ref (guide None), pi_ref guided with ``guidance`` at ``inv_eta``
        (default eval.inv_eta), or a trained ``policy`` (named ``method``; its KL to pi_ref is
        measured teacher-forced on its samples, same convention); cached on disk with the graded
        samples. Every policy is sampled with the same key: common random numbers make the
        comparison less noisy."""
        path = self._eval_path(name)
        if _exists(path):
            _log(f"eval {name}: reusing {path}")
            return _read_json(path)
        e, s = self.cfg.eval, self.cfg.sampler
        inv_eta = e.inv_eta if inv_eta is None else inv_eta
        t = time.time()
        graded = evaluation.sample_and_grade(
            self.sampler(guide, guidance, model=policy),
            self.tokenizer,
            self.eval_prompts,
            [p.answer for p in self.eval_problems],
            n=e.samples_per_problem,
            key=jax.random.fold_in(self.key, 2),
            temperature=s.temperature,
            top_p=s.top_p,
            inv_eta=inv_eta if guide is not None else 0.0,
            guided=guide is not None,
            grader=self.task.grader,
            problems_per_batch=s.problems_per_batch,
            progress=_progress(f"eval {name}"),
        )
        if policy is not None:  # the sampler measured KL(policy as sampled || policy): replace it
            prompts = [p for p, ids in zip(self.eval_prompts, graded.response_ids) for _ in ids]
            kl = divergence.trajectory_kl(
                policy, self.reference.model, prompts, [r for ids in graded.response_ids for r in ids],
                temperature=s.temperature, top_p=s.top_p, pad_id=int(self.cfg.learner.pad_id),
            )  # fmt: skip
            split = np.cumsum([len(ids) for ids in graded.response_ids])[:-1]
            graded.kl_traj[:] = [[float(x) for x in part] for part in np.split(kl, split)]
        metrics = graded.metrics(self.task.grader, rounds=e.pass_at_1_rounds, seed=self.cfg.seed)
        default_method = "pi_ref" if guide is None and policy is None else guidance
        metrics.update(method=method or default_method, inv_eta=inv_eta if guide is not None else 0.0)
        metrics["seconds"] = time.time() - t
        _write_json(path, metrics)
        _write_json(
            os.path.join(self.out, "eval", f"{name}_samples.json"),
            dict(
                questions=[p.question for p in self.eval_problems],
                golds=[p.answer for p in self.eval_problems],
                responses=graded.responses,
                answers=graded.answers,
                correct=graded.correct,
                response_ids=graded.response_ids,
                kl_traj=graded.kl_traj,
                lengths=graded.lengths,
            ),
        )
        _log(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    def reward_model(self, name: str, guide) -> dict:
        """Q# as a reward model (spec 6): the evaluation samples of ``name`` scored by ``guide``'s
        value of each response followed by EOS; best-of-n and value-weighted majority."""
        path = self._eval_path(f"{name}_rm")
        if _exists(path):
            return _read_json(path)
        saved = _read_json(os.path.join(self.out, "eval", f"{name}_samples.json"))
        eos = int(self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.stop_ids()[0])
        stops = set(self.stop_ids())
        sequences, shape = [], []
        for prompt, samples in zip(self.eval_prompts, saved["response_ids"]):
            shape.append(len(samples))
            for ids in samples:
                sequences.append(list(prompt) + list(ids) + ([] if ids and ids[-1] in stops else [eos]))
        values = scoring.sequence_values(guide, sequences, pad_id=int(self.cfg.learner.pad_id))
        split = np.cumsum(shape)[:-1]
        graded = evaluation.Graded(
            saved["responses"],
            saved["answers"],
            saved["correct"],
            saved["kl_traj"],
            saved["lengths"],
            saved["response_ids"],
            [list(v) for v in np.split(values, split)],
        )
        metrics = graded.metrics(self.task.grader, rounds=self.cfg.eval.pass_at_1_rounds, seed=self.cfg.seed)
        metrics.update(method=f"{name} + Q# reward model")
        _write_json(path, metrics)
        return metrics

    # -- Algorithm 1 ------------------------------------------------------------------------
    def _eval_path(self, name: str) -> str:
        return os.path.join(self.out, "eval", f"{name}.json")

    def _guide_needed(self, iteration: int) -> bool:
        """Whether iteration's guide must be trained now: for its evaluation or the next roll-in
        (a resumed run whose later pieces are all saved reads it back only if the sweep needs it)."""
        cfg = self.cfg
        evaluated = cfg.eval.every_iteration or iteration == cfg.collect.iterations
        if evaluated and not _exists(self._eval_path(f"qsharp_iter{iteration}")):
            return True
        if not multihost.agree(os.path.isdir(self.checkpoint_dir(iteration))):
            return True  # the sweep and the reward model read every guide back
        return iteration < cfg.collect.iterations and not self.rollouts_saved(iteration + 1)

    def sweep(self, results: dict[str, dict]) -> dict[str, dict]:
        """pi_ref, then each of eval.methods at each of eval.inv_etas, on the same problems and
        seeds. CD uses the guide of iteration 1 (trained on pi_ref roll-ins only, as in the paper),
        Q# the guide of the last iteration. 1/eta = 0 is the control without value information
        (pi_ref restricted to the k candidates, the same policy for every method): evaluated once."""
        cfg, last = self.cfg, self.cfg.collect.iterations
        points = {"pi_ref": results["pi_ref"]}
        samples = {"pi_ref": "pi_ref"}  # point -> the evaluation whose samples it is
        for method in cfg.eval.methods:
            iteration = 1 if method == "cd" else last
            for inv_eta in cfg.eval.inv_etas:
                name = f"{method}_inv{inv_eta:g}"
                zero = [n for n in points if n.endswith("_inv0")]
                if float(inv_eta) == 0.0 and zero:  # every offset is 0: pi_ref on the top-k, for each method
                    points[name], samples[name] = dict(points[zero[0]], method=method), samples[zero[0]]
                    continue
                same_as_headline = method == "qsharp" and float(inv_eta) == float(cfg.eval.inv_eta)
                if same_as_headline and f"qsharp_iter{last}" in results:
                    points[name] = results[f"qsharp_iter{last}"]  # same policy, key and problems
                    samples[name] = f"qsharp_iter{last}"
                    continue
                guide = None if _exists(self._eval_path(name)) else self.guide(iteration)
                points[name] = self.evaluate(name, guide, guidance=method, inv_eta=float(inv_eta))
                samples[name] = name
        return self.with_paired_differences(points, samples)

    def with_paired_differences(self, points: dict[str, dict], samples: dict[str, str]) -> dict[str, dict]:
        """Each point's per-problem accuracy minus pi_ref's on the same problems and keys
        (``pass@1_vs_pi_ref`` and its paired standard error), read from the saved samples."""
        correct = {}
        for name in set(samples.values()):
            path = os.path.join(self.out, "eval", f"{name}_samples.json")
            if _exists(path):
                correct[name] = _read_json(path)["correct"]
        out = {}
        for name, m in points.items():
            m = dict(m)
            if name != "pi_ref" and samples.get(name) in correct and "pi_ref" in correct:
                diff, se = evaluation.paired_difference(correct[samples[name]], correct["pi_ref"])
                m.update({"pass@1_vs_pi_ref": diff, "pass@1_vs_pi_ref_se": se})
            out[name] = m
        return out

    def run(self) -> dict[str, dict]:
        cfg = self.cfg
        results: dict[str, dict] = {"pi_ref": self.evaluate("pi_ref")}
        per_iteration, guide = [], None
        for iteration in range(1, cfg.collect.iterations + 1):
            per_iteration.append(self.rollouts(iteration, guide))
            guide = None
            if self._guide_needed(iteration):
                guide = self.guides[iteration] = self.train_guide(iteration, collect.aggregate(per_iteration))
            else:
                _log(f"iteration {iteration}: guide not needed (its evaluation and the next rollouts are saved)")
            if cfg.eval.every_iteration or iteration == cfg.collect.iterations:
                name = f"qsharp_iter{iteration}"
                saved = _exists(self._eval_path(name))  # then no guide is needed to read it back
                results[name] = self.evaluate(name, guide or (None if saved else self.guide(iteration)))
        summary: dict = {"policies": results}
        if cfg.eval.inv_etas and cfg.eval.methods:
            points = self.sweep(results)
            summary["sweep"] = points
            eval_dir = os.path.join(self.out, "eval")
            _write_json(os.path.join(eval_dir, "sweep.json"), points)
            if multihost.is_main():
                report.write_csv(os.path.join(eval_dir, "sweep.csv"), points)
                report.plot_accuracy_vs_kl(
                    os.path.join(eval_dir, "accuracy_vs_kl.png"),
                    points,
                    title=f"{cfg.task}: accuracy vs KL "
                    f"({len(self.eval_problems)} problems x {cfg.eval.samples_per_problem} samples)",
                )
        if cfg.eval.reward_model:
            last = self.guide(cfg.collect.iterations)
            rm = {"pi_ref + Q# RM": self.reward_model("pi_ref", last)}
            name = f"qsharp_iter{cfg.collect.iterations}"
            rm[f"{name} + Q# RM"] = self.reward_model(name, last)
            summary["reward_model"] = rm
        calibration = {}
        for iteration in range(1, cfg.collect.iterations + 1):
            path = os.path.join(self.out, "eval", f"calibration_iter{iteration}.json")
            if _exists(path):
                calibration[f"guide_iter{iteration}"] = _read_json(path)
        summary["calibration"] = calibration
        _write_json(os.path.join(self.out, "summary.json"), summary)
        return summary


def check_fits(cfg: ml_collections.ConfigDict) -> None:
    """Refuse, before loading anything, a config whose programs cannot fit the target TPU slice
    (``cfg.topology``, or the running slice when it is a known one): the analytic plan of
    :mod:`qsharp_jax.distributed.planner` on the config's mesh, naming the knob to change."""
    name = cfg.get("topology") or ""
    topo = topologies.get(name) if name else topologies.detect(jax.devices())
    if topo is None:
        return  # CPU, or a slice with no preset: nothing to check against
    try:
        planner.check_config(cfg, topo)
    except planner.PlanError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:  # an architecture the planner cannot read without loading (e.g. a .gguf)
        _log(f"memory plan for {topo.name} skipped: {e}")


# compile seconds (tracing + lowering + XLA) and persistent-cache hits/misses of this process
COMPILE_STATS = {"seconds": 0.0, "/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}
_COMPILE_EVENTS = ("backend_compile_duration", "jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")


def _on_event(event: str, **_):
    if event in COMPILE_STATS:
        COMPILE_STATS[event] += 1


def _on_duration(event: str, seconds: float, **_):
    if event.rsplit("/", 1)[-1] in _COMPILE_EVENTS:
        COMPILE_STATS["seconds"] += seconds


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)


def enable_compilation_cache(cfg: ml_collections.ConfigDict) -> str:
    """Turn on JAX's persistent compilation cache: ``cfg.compilation_cache_dir``, or by default
    $XDG_CACHE_HOME (~/.cache)/qsharp_jax/xla, shared by runs; "off" disables it. Returns the dir."""
    cache_dir = cfg.compilation_cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qsharp_jax", "xla"
    )
    if cache_dir == "off":
        return ""
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache_dir))
    return os.path.abspath(cache_dir)


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Start jax.distributed if configured, validate, check the memory plan, save the effective
    config, run every iteration and the evaluation sweep; returns the summary (``policies``,
    ``sweep``, ``reward_model``, ``calibration``)."""
    try:
        multihost.initialize(cfg)  # before any other JAX call (a no-op if train.py started it)
    except multihost.DistributedConfigError as e:
        raise ConfigError(str(e)) from None
    validate_config(cfg, num_devices=jax.device_count())
    check_fits(cfg)
    cache_dir = enable_compilation_cache(cfg)
    if multihost.is_main():
        path = save_effective_config(cfg, os.path.abspath(cfg.output_dir))
        _log(f"effective config saved to {path}")
    multihost.sync("effective config saved")
    t = time.time()
    summary = QSharpRun(cfg).run()
    if not multihost.is_main():
        return summary
    out = os.path.abspath(cfg.output_dir)
    print(f"\nQ# {cfg.preset} on {cfg.task}: done in {time.time() - t:.0f}s, output in {out}")
    hits, misses = (COMPILE_STATS[f"/jax/compilation_cache/cache_{k}"] for k in ("hits", "misses"))
    print(
        f"compiling: {COMPILE_STATS['seconds']:.0f}s (tracing, lowering, XLA); persistent cache "
        + (f"{cache_dir}: {hits} programs loaded, {misses} compiled and stored" if cache_dir else "off")
    )
    print(report.summary_table(summary["policies"]))
    if "sweep" in summary:
        print(
            f"\neta sweep ({', '.join(cfg.eval.methods)} at 1/eta in {tuple(cfg.eval.inv_etas)}); plot: "
            f"{os.path.join(out, 'eval', 'accuracy_vs_kl.png')}"
        )
        print(report.summary_table(summary["sweep"]))
    if summary.get("reward_model"):
        print("\nQ# as a reward model (last guide's value of each answer + EOS):")
        print(report.summary_table(summary["reward_model"]))
    for name, c in summary["calibration"].items():
        print(
            f"{name} held-out calibration: bce {c['bce']:.3f}, ece {c['ece']:.3f}, "
            f"explained variance {c['explained_variance']:.3f} ({c['examples']} examples)"
        )
    print(report.KL_NOTE)
    return summary
