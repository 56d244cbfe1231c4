"""Q# on GSM8K: ``python -m qsharp_jax.train --config=configs/gsm8k.py[:PRESET]``.

Presets:
  smoke (default)  minutes on a laptop CPU: SmolLM2-135M-Instruct as reference and guide
                   backbone, one iteration on 8 train problems x 2 samples, 64 new tokens,
                   k = 8 guidance candidates, 2 learner steps, evaluation on 8 test problems
                   x 2 samples: pi_ref, Q# and CD at 1/eta = 10, Q# as a reward model.
  paper            the authors' protocol (spec 4.3 and 7): all training problems (90% split),
                   16 samples per problem, 2 iterations, 1024 new tokens, top-k 20,
                   eta = 0.1 (inv_eta 10), 8 evaluation samples on the full test set, the eta
                   sweep, guide trained 5 epochs with AdamW lr 2e-5. Set reference.path /
                   learner.guide.path to converted checkpoints.
  llama3_8b        the paper preset with Llama-3-8B-Instruct guided by Llama-3.2-1B-Instruct,
  llama31_8b       ... Llama-3.1-8B-Instruct guided by Llama-3.2-1B-Instruct,
  qwen2p5_7b       ... Qwen2.5-7B-Instruct guided by Qwen2.5-1.5B-Instruct. These expect the
                   converted models under checkpoints/ (see qsharp_jax.config.MODEL_PRESETS):
                   python -m qsharp_jax.convert --src <HF folder> --out checkpoints/<name> --dtype bfloat16

Override any key with ``--config.section.key=value``; an unknown key is an error that names
the closest valid keys. All values are checked before any model is loaded
(``qsharp_jax.qsharp.job_config.validate_config``).
"""

from __future__ import annotations

import ml_collections

from qsharp_jax.config import MODEL_PRESETS, apply_model_preset, job_defaults

PRESETS = ("smoke", "paper", *MODEL_PRESETS)


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.preset = "smoke"
    c.output_dir = "runs/gsm8k_smoke"
    c.data.num_train_problems = 8
    c.data.num_eval_problems = 8
    c.data.answer_extraction = "boxed_or_last_number"  # SmolLM2-135M answers "... is 12." and never boxes
    c.sampler.max_new_tokens = 64
    c.sampler.k = 8  # guided decoding scores k candidates per step: the main cost on a CPU
    c.collect.samples_per_problem = 2
    c.collect.iterations = 1
    # 64 tokens rarely reach a boxed answer with a 135M model, so every label may be 0; keep
    # such problems so the learner still runs (the paper preset drops them).
    c.collect.drop_no_variation = False
    c.collect.heldout_fraction = 0.0  # 8 problems: every rollout trains the guide
    c.eval.samples_per_problem = 2
    c.eval.inv_etas = (10.0,)
    c.learner.max_steps = 2
    c.learner.batch_size = 2
    c.learner.epochs = 1
    c.learner.buckets = (320,)  # prompt (<= ~200 tokens) + 2 x 64 new tokens: one compiled shape
    c.learner.compute_dtype = "float32"  # bfloat16 matmuls are slow on CPU
    c.learner.lr = 1e-4
    c.learner.log_every = 1
    c.learner.async_checkpointing = False


def _paper(c: ml_collections.ConfigDict) -> None:
    """Spec 4.3 / 7: the job defaults and the learner's are already the paper's."""
    c.preset = "paper"
    c.output_dir = "runs/gsm8k_paper"
    c.reference.dtype = "bfloat16"
    # Without remat the guide's train step keeps every layer's attention probabilities for the
    # backward pass: 50+ GiB per device at batch 32 x 2048 on v5e-8, more than any v4/v5e/v5p
    # chip holds (python -m qsharp_jax.plan; README "Sizing a run"). Remat changes no numbers.
    c.learner.remat = True


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "smoke"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/gsm8k.py; choose one of {PRESETS} "
            "(--config=configs/gsm8k.py:PRESET)."
        )
    c = job_defaults()
    if preset == "smoke":
        _smoke(c)
    elif preset == "paper":
        _paper(c)
    else:
        apply_model_preset(c, preset)
    c.lock()  # unknown keys fail instead of silently creating new settings
    return c
