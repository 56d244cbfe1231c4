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
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from qsharp_jax.checkpoints import loader
from qsharp_jax.core import sharding
from qsharp_jax.guidance import learner as learner_lib
from qsharp_jax.qsharp import collect, evaluation
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig
from qsharp_jax.tasks import data, grading

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = "config.json"
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; raised before any model is loaded."""


# ---- config ---------------------------------------------------------------------------------


def data_path(cfg: ml_collections.ConfigDict, name: str) -> str:
    """A data file path: relative ``data.dir`` values are relative to the repository root."""
    root = cfg.data.dir if os.path.isabs(cfg.data.dir) else os.path.join(REPO_ROOT, cfg.data.dir)
    return os.path.normpath(os.path.join(root, name))


def model_path(path: str) -> str | None:
    """Loader path; "" means the default reference model (SmolLM2)."""
    return path or None


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError listing every bad value (checked before anything is loaded)."""
    bad: list[str] = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = value[part]
            bad.append(f"{key}={value!r}: {why}")

    def positive_int(key: str, allow_all: bool = False) -> None:
        section, name = key.split(".")
        v = cfg[section][name]
        ok = isinstance(v, int) and (v >= 1 or (allow_all and v == -1))
        need(ok, key, "must be a positive integer" + (" (or -1 for all)" if allow_all else ""))

    d = cfg.data
    need(d.answer_format in data.ANSWER_FORMATS, "data.answer_format", f"must be one of {data.ANSWER_FORMATS}")
    need(d.matcher in grading.MATCHERS, "data.matcher", f"must be one of {grading.MATCHERS}")
    need(d.answer_extraction in grading.EXTRACTIONS, "data.answer_extraction", f"must be one of {grading.EXTRACTIONS}")
    need(d.eval_split in ("test", "validation"), "data.eval_split", "must be 'test' or 'validation'")
    need(0.0 < d.validation_fraction < 1.0, "data.validation_fraction", "must be in (0, 1)")
    positive_int("data.num_train_problems", allow_all=True)
    positive_int("data.num_eval_problems", allow_all=True)
    files = [("data.train_file", d.train_file)] + ([("data.eval_file", d.eval_file)] if d.eval_split == "test" else [])
    for key, name in files:
        need(
            os.path.isfile(data_path(cfg, name)),
            key,
            f"no such file {data_path(cfg, name)} (data.dir={d.dir!r} is relative to the repository root)",
        )

    need(not cfg.reference.path or os.path.exists(cfg.reference.path), "reference.path", "does not exist")
    need(not cfg.learner.guide.path or os.path.exists(cfg.learner.guide.path), "learner.guide.path", "does not exist")
    need(cfg.reference.dtype in DTYPES, "reference.dtype", f"must be one of {DTYPES}")

    s = cfg.sampler
    positive_int("sampler.max_new_tokens")
    positive_int("sampler.k")
    positive_int("sampler.problems_per_batch")
    positive_int("sampler.prompt_bucket")
    need(s.temperature > 0 and math.isfinite(s.temperature), "sampler.temperature", "must be > 0")
    need(0.0 < s.top_p <= 1.0, "sampler.top_p", "must be in (0, 1]")
    need(s.guidance in ("qsharp", "cd"), "sampler.guidance", "must be 'qsharp' or 'cd'")

    positive_int("collect.samples_per_problem")
    positive_int("collect.iterations")
    positive_int("collect.problems_per_shard")
    need(cfg.collect.rollin_inv_eta >= 0, "collect.rollin_inv_eta", "must be >= 0")
    need(cfg.collect.max_length == -1 or cfg.collect.max_length >= 2, "collect.max_length", "must be -1 or >= 2")

    positive_int("eval.samples_per_problem")
    positive_int("eval.pass_at_1_rounds")
    need(cfg.eval.inv_eta >= 0, "eval.inv_eta", "must be >= 0")
    need(bool(cfg.output_dir), "output_dir", "must be set")

    m = cfg.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    if not all(isinstance(x, int) and (x >= 1 or x == -1) for x in sizes) or sizes.count(-1) > 1:
        bad.append(f"mesh={dict(m)}: sizes must be positive integers, at most one of them -1")
    elif num_devices is not None:
        known = math.prod(x for x in sizes if x != -1)
        fits = num_devices % known == 0 if -1 in sizes else known == num_devices
        if not fits:
            bad.append(
                f"mesh={dict(m)}: data x fsdp x tensor must equal the {num_devices} available devices "
                "(set one axis to -1 to use the rest)"
            )
        else:  # training batches are split over data x fsdp: catch it now, not after collecting
            resolved = [num_devices // known if x == -1 else x for x in sizes]
            shards = resolved[0] * resolved[1]
            if isinstance(cfg.learner.batch_size, int) and cfg.learner.batch_size % shards:
                bad.append(
                    f"learner.batch_size={cfg.learner.batch_size}: must be a multiple of mesh data x fsdp = {shards}"
                )
    try:
        learner_lib.validate_learner_config(cfg.learner)
    except ValueError as e:
        bad.append(str(e))
    if bad:
        raise ConfigError("invalid config:\n  " + "\n  ".join(bad))


def save_effective_config(cfg: ml_collections.ConfigDict, output_dir: str) -> str:
    """Write the config this run uses; a resumed run must use the same one."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_FILE)
    text = cfg.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(text):
            changed = sorted(_diff_keys(old, json.loads(text)))
            raise ConfigError(
                f"{output_dir} holds a run with a different config (changed: {', '.join(changed)}); "
                "use a new output_dir or restore the old values."
            )
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


# ---- problems ---------------------------------------------------------------------------------


def _take(problems, count):
    return problems if count == -1 else problems[:count]


def load_problem_sets(cfg: ml_collections.ConfigDict) -> tuple[list[data.Problem], list[data.Problem]]:
    """(training problems, evaluation problems) per the data section."""
    d = cfg.data
    pool = data.load_problems(data_path(cfg, d.train_file), d.answer_format)
    split = data.split_problems(pool, d.split_seed, d.validation_fraction)
    if d.eval_split == "test":
        evaluation_set = data.load_problems(
            data_path(cfg, d.eval_file),
            d.answer_format,
            limit=None if d.num_eval_problems == -1 else d.num_eval_problems,
        )
    else:
        evaluation_set = _take(split["validation"], d.num_eval_problems)
    return _take(split["train"], d.num_train_problems), evaluation_set


# ---- the job ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def _progress(desc: str):
    return lambda items: tqdm(items, desc=desc, leave=False, file=sys.stderr)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class QSharpRun:
    """State of one job: config, mesh, reference model, tokenizer, problems, output paths."""

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
        self.train_problems, self.eval_problems = load_problem_sets(cfg)
        self.train_prompts = data.encode_prompts(self.tokenizer, self.train_problems)
        self.eval_prompts = data.encode_prompts(self.tokenizer, self.eval_problems)
        _log(
            f"{len(self.train_problems)} training problems, {len(self.eval_problems)} evaluation problems "
            f"({cfg.data.eval_split})"
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
    def sampler(self, guide=None):
        s = self.cfg.sampler
        stop = set(self.reference.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        pad = self.tokenizer.pad_token_id
        config = SamplerConfig(
            max_new_tokens=s.max_new_tokens,
            k=s.k,
            guidance=s.guidance,
            stop_ids=tuple(sorted(stop)),
            pad_id=int(pad if pad is not None else 0),
            prompt_bucket=s.prompt_bucket,
            batch_bucket=s.problems_per_batch,
        )  # fixed batch shapes: fewer compiles
        return Sampler(self.reference.model, guide, config, mesh=self.mesh)

    def num_shards(self) -> int:
        return -(-len(self.train_problems) // self.cfg.collect.problems_per_shard)

    def rollouts_saved(self, iteration: int) -> bool:
        return all(os.path.exists(collect.rollouts_path(self.out, iteration, s)) for s in range(self.num_shards()))

    def rollouts(self, iteration: int, guide) -> list[collect.Rollout]:
        """This iteration's rollouts: shards saved by an earlier run are read back, the others
        collected now and saved one by one (a killed job loses at most one shard)."""
        c, s = self.cfg.collect, self.cfg.sampler
        guided = iteration > 1
        sampler = None
        rollouts, reused, t = [], 0, time.time()
        for shard in range(self.num_shards()):
            path = collect.rollouts_path(self.out, iteration, shard)
            if os.path.exists(path):
                part = collect.load_rollouts(path)
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
                    matcher=self.cfg.data.matcher,
                    extraction=self.cfg.data.answer_extraction,
                    seed=self.cfg.seed,
                    shard=shard,
                    problems_per_batch=s.problems_per_batch,
                    progress=_progress(f"collect {iteration} shard {shard + 1}/{self.num_shards()}"),
                )
                collect.save_rollouts(path, part)
            rollouts += part
        correct = sum(r.response_correct for r in rollouts) / max(len(rollouts), 1)
        mean_reward = sum(r.reward for r in rollouts) / max(len(rollouts), 1)
        _log(
            f"iteration {iteration}: {len(rollouts)} rollouts ({reused} read back) in {time.time() - t:.0f}s; "
            f"{'guided' if guided else 'pi_ref'} roll-in accuracy {correct:.3f}, mean reward {mean_reward:.3f}"
        )
        return rollouts

    def train_guide(self, iteration: int, rollouts: list[collect.Rollout]):
        """A guide trained from scratch on the aggregated rollouts (resumes its checkpoint)."""
        c = self.cfg.collect
        examples = collect.create_classifier_data(
            rollouts,
            drop_no_variation=c.drop_no_variation,
            use_all_ref_tokens=c.use_all_ref_tokens,
            max_length=c.max_length,
        )
        if not examples:
            raise RuntimeError(
                f"iteration {iteration}: no training examples are left from {len(rollouts)} rollouts: every problem "
                "got the same reward on all its samples and collect.drop_no_variation drops such problems. Collect "
                "more (collect.samples_per_problem, data.num_train_problems, sampler.max_new_tokens) or set "
                "collect.drop_no_variation=False."
            )
        lcfg = self.cfg.learner.copy_and_resolve_references()
        with lcfg.unlocked():
            base = lcfg.checkpoint_dir or os.path.join(self.out, "guide")
            lcfg.checkpoint_dir = os.path.join(os.path.abspath(base), f"iteration_{iteration}")
        t = time.time()
        guide, _ = learner_lib.build_guidance_model(lcfg, self.mesh, reference_tokenizer=self.tokenizer)
        result = learner_lib.fit(guide, examples, lcfg, mesh=self.mesh)
        _log(
            f"iteration {iteration}: guide trained on {len(examples)} examples "
            f"({sum(e.reward for e in examples) / len(examples):.3f} positive), {result.steps_run} steps run in "
            f"{time.time() - t:.0f}s, checkpoints in {lcfg.checkpoint_dir}"
        )
        return result.model

    def evaluate(self, name: str, guide=None) -> dict:
        """Metrics of pi_ref (guide None) or pi_ref guided at eval.inv_eta; cached on disk."""
        path = self._eval_path(name)
        if os.path.exists(path):
            _log(f"eval {name}: reusing {path}")
            return _read_json(path)
        e, s = self.cfg.eval, self.cfg.sampler
        t = time.time()
        # The same key for every policy: common random numbers make the comparison less noisy.
        graded = evaluation.sample_and_grade(
            self.sampler(guide),
            self.tokenizer,
            self.eval_prompts,
            [p.answer for p in self.eval_problems],
            n=e.samples_per_problem,
            key=jax.random.fold_in(self.key, 2),
            temperature=s.temperature,
            top_p=s.top_p,
            inv_eta=e.inv_eta if guide is not None else 0.0,
            guided=guide is not None,
            matcher=self.cfg.data.matcher,
            extraction=self.cfg.data.answer_extraction,
            problems_per_batch=s.problems_per_batch,
            progress=_progress(f"eval {name}"),
        )
        metrics = graded.metrics(matcher=self.cfg.data.matcher, rounds=e.pass_at_1_rounds, seed=self.cfg.seed)
        metrics["inv_eta"] = e.inv_eta if guide is not None else 0.0
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
            ),
        )
        _log(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    # -- Algorithm 1 ------------------------------------------------------------------------
    def _eval_path(self, name: str) -> str:
        return os.path.join(self.out, "eval", f"{name}.json")

    def _guide_needed(self, iteration: int) -> bool:
        """Whether iteration's guide is still used: for its evaluation or the next roll-in
        (a resumed run whose later pieces are all saved skips rebuilding it)."""
        cfg = self.cfg
        evaluated = cfg.eval.every_iteration or iteration == cfg.collect.iterations
        if evaluated and not os.path.exists(self._eval_path(f"qsharp_iter{iteration}")):
            return True
        return iteration < cfg.collect.iterations and not self.rollouts_saved(iteration + 1)

    def run(self) -> dict[str, dict]:
        cfg = self.cfg
        results: dict[str, dict] = {}
        if cfg.eval.baseline:
            results["pi_ref"] = self.evaluate("pi_ref")
        per_iteration, guide = [], None
        for iteration in range(1, cfg.collect.iterations + 1):
            per_iteration.append(self.rollouts(iteration, guide))
            guide = None
            if self._guide_needed(iteration):
                guide = self.train_guide(iteration, collect.aggregate(per_iteration))
            else:
                _log(f"iteration {iteration}: guide not needed (its evaluation and the next rollouts are saved)")
            if cfg.eval.every_iteration or iteration == cfg.collect.iterations:
                results[f"qsharp_iter{iteration}"] = self.evaluate(f"qsharp_iter{iteration}", guide)
        _write_json(os.path.join(self.out, "summary.json"), results)
        return results


def summary_table(results: dict[str, dict]) -> str:
    """Plain-text table, one row per evaluated policy, metrics in a fixed order."""
    keys = [k for m in results.values() for k in m if k not in ("seconds", "num_problems")]
    first = (
        ["pass@1"]
        + sorted(k for k in set(keys) if k.startswith("maj1@"))
        + sorted(k for k in set(keys) if k.startswith("pass@") and k != "pass@1")
        + ["kl", "mean_length", "inv_eta"]
    )
    columns = [k for k in first if k in keys] + sorted(set(keys) - set(first))
    header = ["policy"] + columns
    rows = [[name] + [f"{m[k]:.3f}" if k in m else "-" for k in columns] for name, m in results.items()]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


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


def run(cfg: ml_collections.ConfigDict) -> dict[str, dict]:
    """Validate, save the effective config, run every iteration; returns the metrics per policy."""
    validate_config(cfg, num_devices=jax.device_count())
    cache_dir = enable_compilation_cache(cfg)
    path = save_effective_config(cfg, os.path.abspath(cfg.output_dir))
    _log(f"effective config saved to {path}")
    t = time.time()
    results = QSharpRun(cfg).run()
    print(
        f"\nQ# {cfg.preset}: {len(results)} policies evaluated in {time.time() - t:.0f}s "
        f"(eta = 1/{cfg.eval.inv_eta:g}), output in {os.path.abspath(cfg.output_dir)}"
    )
    hits, misses = (COMPILE_STATS[f"/jax/compilation_cache/cache_{k}"] for k in ("hits", "misses"))
    print(
        f"compiling: {COMPILE_STATS['seconds']:.0f}s (tracing, lowering, XLA); persistent cache "
        + (f"{cache_dir}: {hits} programs loaded, {misses} compiled and stored" if cache_dir else "off")
    )
    print(summary_table(results))
    return results
