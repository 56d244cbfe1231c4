"""Q# on generated arithmetic word problems, where its effect can be measured on a CPU:
``python -m qsharp_jax.train --config=configs/arithmetic.py[:PRESET]``.

SmolLM2-135M-Instruct (the embedded reference) solves about a third of one-digit products
written as word problems ("Tom has 7 bags with 8 apples in each bag...") when sampling at
temperature 0.8 (measured: 31% on 64 samples), so there is room both ways. The guide is
the reference's first ``learner.guide.num_layers`` layers with a fresh V-type head: the small
guide of the paper's setting (a 1B guide for an 8B reference) at this scale.

Presets:
  default  two Q# iterations and the eta sweep (pi_ref, CD and Q# at 1/eta in 3, 10, 30)
           on 48 test problems x 4 samples; README states its wall time.
  quick    the same pipeline at CI size (seconds of training, a handful of problems).

``--config.method=grpo`` trains GRPO at each of ``grpo.betas`` instead (run it after the Q#
job in the same output_dir: it matches the Q# collection's sampled tokens and plots its
points beside the Q# / CD sweep).
"""

from __future__ import annotations

import ml_collections

from qsharp_jax.config import arithmetic_defaults, job_defaults

PRESETS = ("default", "quick")


def _default(c: ml_collections.ConfigDict) -> None:
    c.task = "arithmetic"
    c.output_dir = "runs/arithmetic"
    c.arithmetic = arithmetic_defaults()
    c.arithmetic.num_train = 80
    c.arithmetic.num_test = 48
    c.data.answer_extraction = "boxed_or_last_number"  # SmolLM2 states its answer; it seldom boxes
    c.data.matcher = "strict"
    c.sampler.max_new_tokens = 96
    c.sampler.k = 6
    c.sampler.problems_per_batch = 16  # x 4 samples = 64 rows per decode: the CPU's efficient batch
    c.collect.samples_per_problem = 4
    c.collect.iterations = 2
    c.collect.problems_per_shard = 24
    c.collect.heldout_fraction = 0.1
    c.eval.samples_per_problem = 4
    c.eval.inv_etas = (3.0, 10.0, 30.0)
    c.eval.every_iteration = False  # the last iteration's guide is the sweep's Q# (1/eta = 10 point)
    c.learner.guide.num_layers = 2
    c.learner.compute_dtype = "float32"  # bfloat16 matmuls are slow on CPU
    c.learner.lr = 1e-4
    c.learner.batch_size = 16
    c.learner.epochs = 2
    c.learner.buckets = (192, 256)
    c.learner.log_every = 20
    c.learner.save_every = 100
    # GRPO beside Q# (--config.method=grpo): 2 problems x 4 samples per batch, each beta until
    # it has sampled as many response tokens as the Q# collection above (token_budget -1: its
    # roll-ins + roll-outs, 79.5k tokens, about 125 batches; steps only caps it). Batches of 8
    # rows: a full fine-tune of the 135M policy on 32 rows peaked above 18 GB (the 23 GB VM's OOM
    # killer), while 8 rows fit in a few GB without remat, which saves the recomputed forward.
    c.grpo.betas = (0.04, 0.0, 0.4)  # the paper's beta first
    c.grpo.token_budget = -1
    c.grpo.steps = 400
    c.grpo.prompts_per_step = 2
    c.grpo.group_size = 4
    c.grpo.lr = 2e-5
    c.grpo.remat = False
    c.grpo.save_every = 8
    c.grpo.log_every = 8


def _quick(c: ml_collections.ConfigDict) -> None:
    c.preset = "quick"
    c.output_dir = "runs/arithmetic_quick"
    c.arithmetic.num_train = 8
    c.arithmetic.num_test = 4
    c.sampler.max_new_tokens = 24
    c.sampler.k = 4
    c.sampler.problems_per_batch = 4
    c.collect.samples_per_problem = 2
    c.collect.problems_per_shard = 4
    c.collect.drop_no_variation = False
    c.collect.heldout_fraction = 0.0
    c.eval.samples_per_problem = 2
    c.eval.inv_etas = (3.0, 10.0)
    c.eval.every_iteration = True
    c.learner.guide.num_layers = 2
    c.learner.max_steps = 2
    c.learner.batch_size = 4
    c.learner.buckets = (160,)
    c.learner.log_every = 1
    c.learner.async_checkpointing = False
    c.grpo.betas = (0.0, 0.4)
    c.grpo.token_budget = 96  # a few batches of 2 problems x 2 samples
    c.grpo.prompts_per_step = 2
    c.grpo.group_size = 2
    c.grpo.save_every = 1


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "default"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/arithmetic.py; choose one of {PRESETS} "
            "(--config=configs/arithmetic.py:PRESET)."
        )
    c = job_defaults()
    c.preset = preset
    _default(c)
    if preset == "quick":
        _quick(c)
    c.lock()
    return c
