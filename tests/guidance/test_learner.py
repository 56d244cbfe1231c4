"""The learner: batching, V/Q alignment, learning a synthetic rule, config and tokenizer
errors, and the sharded train step on 8 fake devices (in a subprocess) == unsharded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.config import learner_defaults
from qsharp_jax.guidance import batching, learner, model as guidance_model, train_step
from qsharp_jax.models import decoder as model
from qsharp_jax.models.config import ModelConfig

from conftest import ROOT

TINY = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
)


def rule_examples(n, seed=0):
    """Synthetic labelling rule: R = 1 iff the first input token is 11 (else it is 10);
    the rest of the input and the whole target are noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = float(rng.integers(0, 2))
        out.append(
            batching.Example(
                [10 + int(r)] + list(rng.integers(20, 64, rng.integers(1, 6))),
                list(rng.integers(20, 64, rng.integers(1, 8))),
                r,
            )
        )
    return out


# ---- batching -----------------------------------------------------------------------------


def test_collate_left_pads_and_masks_targets():
    b = batching.collate([batching.Example([5, 6], [7, 8, 9], 1.0, 2.0), None], 6, pad_id=0)
    np.testing.assert_array_equal(b["tokens"], [[0, 5, 6, 7, 8, 9], [0] * 6])
    np.testing.assert_array_equal(b["token_mask"], [[0, 1, 1, 1, 1, 1], [0] * 6])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 1], [0] * 6])
    np.testing.assert_array_equal(b["reward"], [1.0, 0.0])
    np.testing.assert_array_equal(b["weight"], [2.0, 0.0])  # padding rows weigh 0


def test_buckets_truncate_drop_and_plan_is_a_pure_function_of_seed_and_epoch():
    exs = [
        batching.Example([1] * 3, [2] * 2, 0.0),  # 5 -> bucket 8
        batching.Example([1] * 6, [2] * 6, 1.0),  # 12 -> bucket 16
        batching.Example([1] * 10, [2] * 20, 1.0),  # 30 -> truncated to 16
        batching.Example([1] * 16, [2], 1.0),
    ]  # input alone fills 16: dropped
    data = batching.bucket_examples(exs, (16, 8))
    assert data.buckets == (8, 16) and [len(e) for e in data.examples] == [1, 2]
    assert data.num_dropped == 1 and data.num_truncated == 1 and len(data.examples[1][1].target_ids) == 6

    data = batching.bucket_examples(rule_examples(50), (8, 16))
    plan = batching.epoch_plan(data, 8, seed=1, epoch=0)
    assert [(b, i.tolist()) for b, i in plan] == [(b, i.tolist()) for b, i in batching.epoch_plan(data, 8, 1, 0)]
    assert [i.tolist() for _, i in plan] != [i.tolist() for _, i in batching.epoch_plan(data, 8, 1, 1)]
    seen = sorted((b, int(i)) for b, idx in plan for i in idx if i >= 0)  # every example exactly once
    assert seen == sorted((b, i) for b, e in enumerate(data.examples) for i in range(len(e)))


# ---- model-side alignment -----------------------------------------------------------------


def test_q_type_predictions_are_the_previous_position_read_at_the_next_token():
    backbone = model.build(TINY)  # tied embeddings: both heads can sit on the same backbone
    for dist in ("bernoulli", "categorical"):
        guide = guidance_model.build(
            backbone, guidance_model.HeadConfig(kind="q", distribution=dist, num_atoms=3), seed=2
        )
        batch = batching.collate([batching.Example([3, 4, 5], [6, 7], 1.0), batching.Example([8], [9], 0.0)], 6)

        @nnx.jit
        def both(guide, batch):
            out, mask = train_step.predictions(guide, batch)
            h, _ = guide.hidden(
                batch["tokens"], model.positions_from_mask(batch["token_mask"]), token_mask=batch["token_mask"]
            )
            return out, mask, guide.head_outputs(h)  # dense: [B, T, V(, A)], every entry at every position

        out, mask, dense = both(guide, batch)
        idx = batch["tokens"][:, 1:].reshape(2, 5, *([1] * (dense.ndim - 2)))
        want = jnp.take_along_axis(dense[:, :-1], idx, axis=2)[:, :, 0]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mask, batch["loss_mask"][:, 1:])


# ---- learning -------------------------------------------------------------------------------


def test_tiny_guidance_model_learns_a_labelling_rule(tmp_path):
    """V-type Bernoulli head, bf16 compute / fp32 master weights, 200 steps: the BCE falls from
    ln 2 ~ 0.69 by at least 10x, the predictions end up calibrated, and the rule generalizes.

    Margins come from the learning problem, not from one CPU: 512 distinct training sequences
    (so the head cannot memorize noise tokens), and fresh sequences are judged by their mean
    prediction over the target positions, the per-sequence value the rule defines; single
    positions far from the deciding first token may stay unsure in bf16."""
    guide = guidance_model.build(
        model.build(TINY, dtype=jnp.bfloat16, param_dtype=jnp.float32), guidance_model.HeadConfig(), seed=0
    )
    c = learner_defaults()
    c.update(
        dict(
            lr=3e-3,
            warmup_steps=10,
            batch_size=16,
            epochs=7,
            max_steps=200,
            buckets=(16,),
            log_every=20,
            progress_bar=False,
            logdir=str(tmp_path / "tb"),
        )
    )
    result = learner.fit(guide, rule_examples(512), c)
    first, last = result.history[0], result.history[-1]
    assert result.steps_run == 200 and last["step"] == 200
    assert first["loss"] > 0.3 and last["loss"] < first["loss"] / 10, result.history
    assert last["ece"] < 0.05 and last["explained_variance"] > 0.9
    assert os.listdir(tmp_path / "tb")  # TensorBoard event file written
    # The trained model separates the two classes on fresh data.
    batch = batching.collate(rule_examples(32, seed=99), 32)
    out, mask = train_step.predictions(result.model, batch)
    p, mask = np.asarray(jax.nn.sigmoid(out)), np.asarray(mask)
    per_sequence = (p * mask).sum(axis=1) / mask.sum(axis=1)
    labels = np.asarray(batch["reward"])
    assert np.all((per_sequence > 0.5) == (labels > 0.5)), (per_sequence, labels)
    per_position = (p > 0.5) == (np.broadcast_to(labels[:, None], mask.shape) > 0.5)
    assert per_position[mask].mean() >= 0.95, per_position[mask].mean()


def test_categorical_q_type_learns_the_rule_too(tmp_path):
    guide = guidance_model.build(
        model.build(TINY),
        guidance_model.HeadConfig(kind="q", distribution="categorical", num_atoms=5, init="zero"),
        seed=0,
    )
    c = learner_defaults()
    c.update(
        dict(
            loss_type="categorical",
            lr=3e-3,
            clip=0.0,
            batch_size=16,
            epochs=10,
            buckets=(16,),
            log_every=10,
            progress_bar=False,
            compute_dtype="float32",
            checkpoint_dir=str(tmp_path / "ckpt"),
            save_every=1000,
        )
    )
    c.guide.head.update(dict(kind="q", distribution="categorical", num_atoms=5, init="zero"))
    result = learner.fit(guide, rule_examples(128), c)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first / 3, result.history  # CE over 5 atoms starts at ln 5 ~ 1.61

    # The trained guide reads back from its checkpoint dir alone (no backbone source needed).
    restored = learner.load_trained_guide(str(tmp_path / "ckpt"))
    assert restored.head_cfg == result.model.head_cfg and restored.cfg == TINY
    batch = batching.collate(rule_examples(4, seed=7), 16)
    want, mask = train_step.predictions(result.model, batch)
    got, _ = train_step.predictions(restored, batch)
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(mask)], np.asarray(want)[np.asarray(mask)])
    with pytest.raises(FileNotFoundError, match=r"effective_config\.json"):
        learner.load_trained_guide(str(tmp_path))


# ---- errors ------------------------------------------------------------------------------------


def test_bad_config_values_are_listed():
    c = learner_defaults()
    c.update(dict(lr=-1.0, schedule="linear", batch_size=0, clip=-2.0, loss_type="categorical"))
    with pytest.raises(ValueError) as e:
        learner.validate_learner_config(c)
    msg = str(e.value)
    for key in (
        "learner.lr=-1.0",
        "learner.schedule='linear'",
        "learner.batch_size=0",
        "learner.clip=-2.0",
        "loss_type='categorical' needs guide.head.distribution='categorical'",
    ):
        assert key in msg, msg


def test_no_usable_examples_and_bad_rewards_are_clear_errors():
    c = learner_defaults()
    c.update(dict(batch_size=4, buckets=(2,), progress_bar=False))
    # Raised before any model is loaded (guide=None would load the default reference).
    with pytest.raises(ValueError, match="no training examples left after bucketing"):
        learner.fit(None, rule_examples(4), c)  # every example is longer than the only bucket
    with pytest.raises(ValueError, match="rewards must be finite"):
        learner.fit(None, [batching.Example([1], [2], float("inf"))], c)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_mismatch_names_both_models(tmp_path, tiny_hf_models):
    words = ["<unk>"] + [f"w{i}" for i in range(255)]
    guide_dir = tmp_path / "guide"
    shutil.copytree(tiny_hf_models("llama"), guide_dir)
    _word_tokenizer(words).save_pretrained(guide_dir)
    c = learner_defaults()
    c.guide.path = str(guide_dir)
    c.compute_dtype = "float32"

    guide, _ = learner.build_guidance_model(c, reference_tokenizer=_word_tokenizer(words))  # same: fine
    assert isinstance(guide, guidance_model.GuidanceModel) and guide.head.get_value().shape == (64, 1)

    swapped = list(words)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    with pytest.raises(ValueError) as e:
        learner.build_guidance_model(c, reference_tokenizer=_word_tokenizer(swapped))
    msg = str(e.value)
    assert str(guide_dir) in msg and "reference model" in msg and "2 tokens map to different ids" in msg
    assert "learner.guide.path" in msg  # says what to change
    with pytest.raises(ValueError, match="vocab sizes differ: guide 256 vs reference 200"):
        learner.check_same_tokenizer(_word_tokenizer(words), _word_tokenizer(words[:200]), "guide-x", "ref-y")


# ---- sharding ------------------------------------------------------------------------------------

SHARDED = textwrap.dedent("""
    import os
    # Before jax is imported. Low backend optimisation: faster compiles, both meshes share it.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from qsharp_jax.guidance import batching
    from qsharp_jax.config import learner_defaults
    from qsharp_jax.guidance import learner
    from qsharp_jax.models import decoder as model
    from qsharp_jax.guidance import model as guidance_model
    from qsharp_jax.models.config import ModelConfig
    from qsharp_jax.core.sharding import make_mesh

    assert jax.device_count() == 8
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    examples = [batching.Example(list(rng.integers(1, 64, rng.integers(1, 6))), list(rng.integers(1, 64, 4)),
                                 float(i % 2)) for i in range(24)]
    c = learner_defaults()
    c.update(dict(lr=1e-2, batch_size=8, epochs=1, buckets=(12,), progress_bar=False, compute_dtype="float32"))
    meshes = {"sharded": make_mesh(data=2, fsdp=2, tensor=2), "single": make_mesh(1, 1, 1, devices=jax.devices()[:1])}
    params = {}
    for name, mesh in meshes.items():
        guide = guidance_model.build(model.build(cfg), guidance_model.HeadConfig(), seed=3)
        result = learner.fit(guide, examples, c, mesh=mesh)
        leaves = jax.tree_util.tree_leaves_with_path(result.state.params)
        params[name] = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
        if name == "sharded":  # really sharded: the MLP is split over fsdp x tensor
            up = result.state.params["backbone"]["layers"][0]["mlp"]["up"].get_value()
            assert len(up.sharding.device_set) == 8 and up.addressable_shards[0].data.shape == (16, 32), up.sharding
    diffs = np.concatenate([np.abs(params["sharded"][k] - params["single"][k]).ravel() for k in params["single"]])
    worst, loose = float(diffs.max()), float(np.mean(diffs > 1e-6))
    init = guidance_model.build(model.build(cfg), guidance_model.HeadConfig(), seed=3)
    init_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(init, nnx.Param))
    start = {jax.tree_util.keystr(p): np.asarray(v) for p, v in init_leaves}
    moved = max(float(np.max(np.abs(params["single"][k] - start[k]))) for k in params["single"])
    c.batch_size = 6  # rows split over data x fsdp = 4
    try:
        learner.fit(guidance_model.build(model.build(cfg), guidance_model.HeadConfig()), examples, c,
                    mesh=meshes["sharded"])
        raise AssertionError("batch 6 on data x fsdp = 4 should fail")
    except ValueError as e:
        assert "batch size=6 is not divisible" in str(e), e
        print("MESH_ERROR", e)
    print("MAX_ABS_DIFF", worst, moved, loose)
""")


def test_sharded_train_step_on_8_fake_devices_matches_unsharded(tmp_path):
    """Three AdamW steps (float32 compute) on a (data=2, fsdp=2, tensor=2) mesh vs one device
    give the same params up to the reduction order (bounds in the test body)."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    worst, moved, loose = (float(x) for x in out.stdout.split("MAX_ABS_DIFF")[1].split()[:3])
    # Only the float32 reduction order differs. Adam divides each gradient by its own scale, so
    # an entry whose gradient is a near-cancelling sum can take a visibly different step; every
    # other entry agrees to float32 precision. A sharding bug (a missing or doubled shard)
    # moves most entries by a fraction of the training step itself.
    assert loose <= 0.01, f"{loose:.2%} of parameter entries differ by more than 1e-6"
    assert worst <= 0.01 * moved, (worst, moved)
    assert "MESH_ERROR" in out.stdout
    print("sharded vs unsharded after 3 steps: max abs diff", worst, "largest move", moved, "loose", loose)
