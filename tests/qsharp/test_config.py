import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from qsharp_jax.qsharp import loop

from conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "gsm8k.py")
HAS_DATA = os.path.isfile(os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl"))


def parse(*overrides, preset=""):
    """The config as the CLI builds it: ``--config=configs/gsm8k.py[:preset] --config.x=y``."""
    argv = ["prog", f"--config={CONFIG}{':' + preset if preset else ''}", *overrides]
    fv = flags.FlagValues()
    # Override flags are found in argv when the flag is defined (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_default_preset_is_the_smoke_run():
    cfg = parse()
    assert cfg.preset == "smoke"
    assert cfg.data.num_train_problems == 8 and cfg.collect.samples_per_problem == 2
    assert cfg.sampler.max_new_tokens == 64 and cfg.learner.max_steps > 0 and cfg.sampler.k == 8
    assert cfg.reference.path == "" and cfg.learner.guide.path == ""  # SmolLM2 for both


def test_paper_preset_follows_the_spec():
    cfg = parse(preset="paper")
    assert (cfg.sampler.temperature, cfg.sampler.top_p, cfg.sampler.k, cfg.sampler.max_new_tokens) == (
        0.8,
        0.9,
        20,
        1024,
    )
    assert (cfg.collect.samples_per_problem, cfg.collect.iterations, cfg.eval.samples_per_problem) == (16, 2, 8)
    assert cfg.eval.inv_eta == 10.0 and cfg.collect.drop_no_variation and cfg.collect.use_all_ref_tokens
    assert (cfg.learner.lr, cfg.learner.weight_decay, cfg.learner.epochs, cfg.learner.batch_size) == (2e-5, 0.01, 5, 32)
    assert cfg.learner.clip == 5.0 and cfg.learner.guide.head.kind == "v" and cfg.learner.loss_type == "bce"
    assert cfg.data.num_train_problems == -1 and cfg.data.num_eval_problems == -1


def test_overrides_are_applied_and_typed():
    cfg = parse("--config.sampler.top_p=0.5", "--config.collect.iterations=3", "--config.learner.lr=0.001")
    assert cfg.sampler.top_p == 0.5 and cfg.collect.iterations == 3 and cfg.learner.lr == 0.001


def test_unknown_key_fails():
    with pytest.raises(Exception, match=r"sampler\.topp|topp"):
        parse("--config.sampler.topp=0.5")


def test_unknown_preset_fails():
    with pytest.raises(Exception, match="unknown preset 'huge'"):
        parse(preset="huge")


@pytest.mark.skipif(not HAS_DATA, reason="../shared/data is absent")
def test_presets_validate():
    loop.validate_config(parse(), num_devices=1)
    loop.validate_config(parse(preset="paper"), num_devices=1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.sampler.top_p=1.5", "sampler.top_p=1.5: must be in (0, 1]"),
        ("--config.sampler.top_p=0.0", "sampler.top_p=0.0: must be in (0, 1]"),
        ("--config.sampler.temperature=0.0", "sampler.temperature=0.0: must be > 0"),
        ("--config.collect.samples_per_problem=0", "collect.samples_per_problem=0: must be a positive integer"),
        ("--config.eval.samples_per_problem=-2", "eval.samples_per_problem=-2: must be a positive integer"),
        ("--config.data.num_train_problems=0", "data.num_train_problems=0: must be a positive integer (or -1 for all)"),
        ("--config.data.train_file=gsm8k/nope.jsonl", "data.train_file='gsm8k/nope.jsonl': no such file"),
        ("--config.data.dir=/nonexistent", "data.train_file='gsm8k/train.jsonl': no such file /nonexistent/gsm8k"),
        ("--config.data.matcher=fuzzy", "data.matcher='fuzzy': must be one of"),
        ("--config.sampler.guidance=magic", "sampler.guidance='magic'"),
        ("--config.reference.path=/no/model.gguf", "reference.path='/no/model.gguf': does not exist"),
        ("--config.mesh.tensor=2", "data x fsdp x tensor must equal the 1 available devices"),
        ("--config.learner.lr=-1.0", "learner.lr=-1.0: must be a positive finite number"),
    ],
)
def test_validation_names_the_bad_value(override, message):
    cfg = parse(override)
    with pytest.raises(loop.ConfigError) as info:
        loop.validate_config(cfg, num_devices=1)
    assert message in str(info.value)


def test_learner_batch_must_split_over_the_mesh():
    cfg = parse("--config.learner.batch_size=2")
    loop.validate_config(cfg, num_devices=2)
    with pytest.raises(loop.ConfigError, match=r"learner\.batch_size=2: must be a multiple of mesh data x fsdp = 8"):
        loop.validate_config(cfg, num_devices=8)


def test_validation_reports_every_problem_at_once():
    cfg = parse("--config.sampler.top_p=2.0", "--config.collect.iterations=0")
    with pytest.raises(loop.ConfigError) as info:
        loop.validate_config(cfg, num_devices=1)
    assert "sampler.top_p" in str(info.value) and "collect.iterations" in str(info.value)


def test_effective_config_is_saved_and_guards_resumes(tmp_path):
    cfg = parse(f"--config.output_dir={tmp_path}")
    path = loop.save_effective_config(cfg, str(tmp_path))
    with open(path) as f:
        assert json.load(f)["sampler"]["top_p"] == 0.9
    loop.save_effective_config(cfg, str(tmp_path))  # same config: fine (a resume)
    changed = parse(f"--config.output_dir={tmp_path}", "--config.sampler.top_p=0.5")
    with pytest.raises(loop.ConfigError, match=r"changed: sampler\.top_p"):
        loop.save_effective_config(changed, str(tmp_path))
