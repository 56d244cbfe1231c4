"""Q# on MATH: ``python -m qsharp_jax.train --config=configs/math500.py[:PRESET]``.

The paper trains on MATH train and tests on MATH-500 (spec 4.1-4.4): answers in \\boxed{},
graded with math-verify (``symbolic``), MATH-format gold answers (``The answer is:`` /
last ``\\boxed{}``).

Presets:
  smoke (default)  runs here with no extra data: ../shared/data holds MATH-500 only, so the
                   smoke preset splits MATH-500 itself 90/10 by a seeded hash and evaluates on
                   the held-out 10% (``data.eval_split=validation``): a mechanics check, not the
                   paper's test protocol. SmolLM2-135M, 8 + 8 problems, 96 new tokens.
  paper            MATH train (data.train_file, a JSONL with question/answer per line, answer
                   holding the worked solution with its \\boxed{}) and MATH-500 test, the paper's
                   sampler, collection, learner and sweep settings. Set reference.path and
                   learner.guide.path to converted checkpoints.
  llama3_8b, llama31_8b, qwen2p5_7b
                   the paper preset with the model pairs of qsharp_jax.config.MODEL_PRESETS
                   (convert each with python -m qsharp_jax.convert ... --out checkpoints/<name>).
"""

from __future__ import annotations

import ml_collections

from qsharp_jax.config import MODEL_PRESETS, apply_model_preset, job_defaults

PRESETS = ("smoke", "paper", *MODEL_PRESETS)


def _math(c: ml_collections.ConfigDict) -> None:
    c.task = "math"
    c.data.train_file = "math/train.jsonl"  # not shipped here: point data.dir / data.train_file at MATH train
    c.data.eval_file = "math500/test.jsonl"
    c.data.answer_format = "math"


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.preset = "smoke"
    c.output_dir = "runs/math500_smoke"
    c.data.train_file = "math500/test.jsonl"
    c.data.eval_split = "validation"
    c.data.num_train_problems = 8
    c.data.num_eval_problems = 8
    c.sampler.max_new_tokens = 96
    c.sampler.k = 8
    c.collect.samples_per_problem = 2
    c.collect.iterations = 1
    c.collect.drop_no_variation = False
    c.collect.heldout_fraction = 0.0
    c.eval.samples_per_problem = 2
    c.eval.inv_etas = (10.0,)
    c.learner.max_steps = 2
    c.learner.batch_size = 2
    c.learner.epochs = 1
    c.learner.buckets = (448,)
    c.learner.compute_dtype = "float32"
    c.learner.lr = 1e-4
    c.learner.log_every = 1
    c.learner.async_checkpointing = False


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "smoke"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/math500.py; choose one of {PRESETS} "
            "(--config=configs/math500.py:PRESET)."
        )
    c = job_defaults()
    _math(c)
    if preset == "smoke":
        _smoke(c)
    elif preset == "paper":
        c.preset, c.output_dir, c.reference.dtype = "paper", "runs/math500_paper", "bfloat16"
        c.learner.remat = True  # as in configs/gsm8k.py::_paper: the train step fits no chip without it
    else:
        apply_model_preset(c, preset)
    c.lock()
    return c
