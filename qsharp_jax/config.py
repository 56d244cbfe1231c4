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


def mesh_defaults() -> ml_collections.ConfigDict:
    """Device mesh sizes; -1 takes all remaining devices."""
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
