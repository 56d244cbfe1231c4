"""GRPO beside Q# on a task of the Q# job (issue 14):
``python -m qsharp_jax.train --config=configs/arithmetic.py --config.method=grpo``.

For each KL coefficient in ``grpo.betas``, a copy of the reference is trained in full with GRPO
(:mod:`qsharp_jax.baselines.grpo`) on the task's training problems, reward 1 when the task's
grader accepts the decoded response (the Q# reward), until it has sampled
``grpo.token_budget`` response tokens (-1: as many as the Q# collection saved in the same
``output_dir``, roll-ins plus pi_ref roll-outs: the same sampling budget). Each policy is then
evaluated exactly like the points of the Q# sweep (same problems, samples, key, temperature and
top-p), with its KL to pi_ref measured teacher-forced on its own samples under the same
convention (:mod:`qsharp_jax.policy.divergence`).

Outputs: ``output_dir/grpo/`` holds this job's config, one checkpoint directory and run record
per beta, ``frontier.json`` / ``frontier.csv`` (the Q# run's sweep plus the GRPO points, each
with sampled tokens, optimizer steps and wall time) and ``accuracy_vs_kl.png``; the evaluations
are ``output_dir/eval/grpo_beta<b>.json`` beside the sweep's. A rerun resumes: finished betas
are read back, a started one continues from its last checkpoint. ``grpo.betas`` may differ
between runs (two processes can train different betas in one ``output_dir``); every other key
must match the saved config.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from qsharp_jax.baselines import grpo
from qsharp_jax.core import multihost
from qsharp_jax.qsharp import evaluation, report
from qsharp_jax.qsharp.job_config import (
    EXTENDABLE,
    PLACEMENT_KEYS,
    ConfigError,
    save_effective_config,
    validate_config,
)
from qsharp_jax.qsharp.loop import QSharpRun, enable_compilation_cache


def _log(message: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def qsharp_collection_tokens(output_dir: str, iteration: str = "*") -> int:
    """Response tokens the Q# job sampled in ``output_dir``: every saved rollout's roll-in
    response plus its pi_ref roll-out continuation, over all iterations (or one)."""
    total = 0
    for path in sorted(glob.glob(os.path.join(output_dir, "rollouts", f"iteration_{iteration}", "shard_*.jsonl"))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    total += len(record["response_ids"]) + len(record["continuation_ids"])
    return total


def guide_steps(run: QSharpRun, iteration: int) -> int:
    """Optimizer steps of an iteration's guide: its last checkpoint's step (0 if none saved)."""
    directory = run.checkpoint_dir(iteration)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return max((int(n) for n in names if n.isdigit()), default=0)  # Orbax names step directories by step


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Train and evaluate GRPO at every beta of ``cfg.grpo.betas``; returns the frontier
    {name: metrics} (the Q# run's sweep points when saved, then the GRPO points)."""
    multihost.initialize(cfg)
    validate_config(cfg, num_devices=jax.device_count())
    try:
        grpo.validate_grpo_config(cfg.grpo)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.grpo.betas or any(b < 0 for b in cfg.grpo.betas):
        raise ConfigError(f"grpo.betas={tuple(cfg.grpo.betas)!r}: give one or more KL coefficients >= 0.")
    out = os.path.abspath(cfg.output_dir)
    grpo_dir = os.path.join(out, "grpo")
    budget = cfg.grpo.token_budget
    if budget < 0:
        budget = qsharp_collection_tokens(out)
        if budget == 0:
            raise ConfigError(
                f"grpo.token_budget=-1 matches the Q# collection, but {out}/rollouts holds none: run the Q# job "
                "first (the same command without --config.method=grpo) or set --config.grpo.token_budget=N."
            )
    enable_compilation_cache(cfg)
    # betas may change between runs (each is trained and saved under its own name, like the
    # sweep's inv_etas): another process can add one in parallel; a run with all of them assembles the frontier
    saved = save_effective_config(cfg, grpo_dir, free=EXTENDABLE + PLACEMENT_KEYS + ("grpo.betas",))
    _log(f"effective config saved to {saved}; token budget per beta: {budget}")
    t = time.time()
    r = QSharpRun(cfg)
    sampler_config = r.sampler().config
    grader, golds = r.task.grader, [p.answer for p in r.train_problems]
    tokenizer = r.tokenizer

    def reward(prompt_index: np.ndarray, out) -> np.ndarray:
        texts = evaluation.response_texts(out, tokenizer)
        return np.array([float(grader.same(golds[i], grader.extract(x))) for i, x in zip(prompt_index, texts)])

    points = {}
    for beta in cfg.grpo.betas:
        name = f"grpo_beta{beta:g}"
        path = os.path.join(out, "eval", f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                points[name] = json.load(f)
            _log(f"{name}: reusing {path}")
            continue
        c = cfg.grpo.copy_and_resolve_references()
        c.beta, c.token_budget = float(beta), int(budget)
        policy, record = grpo.train(
            nnx.clone(r.reference.model), r.reference.model, r.train_prompts, reward, c, sampler_config,
            os.path.join(grpo_dir, f"beta{beta:g}", "checkpoints"), _log, desc=f"GRPO beta={beta:g}",
        )  # fmt: skip
        _write_json(os.path.join(grpo_dir, f"beta{beta:g}", "record.json"), record)
        metrics = r.evaluate(name, policy=policy, method="grpo")
        metrics.update(
            label=f"β={beta:g}", beta=float(beta), sampled_tokens=record["sampled_tokens"],
            optimizer_steps=record["optimizer_steps"], batches=record["batches"],
            train_seconds=round(record["seconds"], 1),
        )  # fmt: skip
        _write_json(path, metrics)
        points[name] = metrics
    # paired against pi_ref's samples (same problems and per-row keys), like the sweep's points
    points = r.with_paired_differences(points, {name: name for name in [*points, "pi_ref"]})
    sweep_path = os.path.join(out, "eval", "sweep.json")
    frontier = {}
    if os.path.exists(sweep_path):
        with open(sweep_path) as f:
            frontier = json.load(f)
        # the collection and guide training behind each guide: CD's is iteration 1's, Q#'s every iteration's
        iterations = cfg.collect.iterations
        tokens = dict(qsharp=qsharp_collection_tokens(out), cd=qsharp_collection_tokens(out, "1"))
        steps = dict(qsharp=sum(guide_steps(r, k) for k in range(1, iterations + 1)), cd=guide_steps(r, 1))
        for m in frontier.values():
            if m.get("method") in tokens:
                m.update(sampled_tokens=tokens[m["method"]], optimizer_steps=steps[m["method"]])
    frontier.update(points)
    if multihost.is_main():
        _write_json(os.path.join(grpo_dir, "frontier.json"), frontier)
        report.write_csv(os.path.join(grpo_dir, "frontier.csv"), frontier)
        report.plot_accuracy_vs_kl(
            os.path.join(grpo_dir, "accuracy_vs_kl.png"),
            frontier,
            title=f"{cfg.task}: Q#, CD and GRPO ({len(r.eval_problems)} problems x {cfg.eval.samples_per_problem})",
        )
        print(f"\nGRPO on {cfg.task}: done in {time.time() - t:.0f}s, output in {grpo_dir}")
        print(report.summary_table(frontier))
        print(report.KL_NOTE)
    return frontier
