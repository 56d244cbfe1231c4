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
    # a multi-host rerun may meet at another coordinator port: not a different run
    moved = parse(f"--config.output_dir={tmp_path}", "--config.distributed.coordinator_address=localhost:1234")
    loop.save_effective_config(moved, str(tmp_path))
    changed = parse(f"--config.output_dir={tmp_path}", "--config.sampler.top_p=0.5")
    with pytest.raises(loop.ConfigError, match=r"changed: sampler\.top_p"):
        loop.save_effective_config(changed, str(tmp_path))


def _train(*args):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "qsharp_jax.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_key_on_the_command_line_names_the_closest_keys():
    out = _train(f"--config={CONFIG}", "--config.sampler.kk=3", "--config.samplr.top_p=0.5")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown config key 'sampler.kk'; did you mean sampler.k"), out.stderr[-2000:]
    assert "unknown config key 'samplr.top_p'; did you mean sampler.top_p" in last
    assert "Traceback" not in out.stderr


def test_unknown_key_helper_lists_every_bad_key():
    from qsharp_jax.qsharp.job_config import config_keys, unknown_override_keys

    cfg = parse()
    assert "learner.guide.head.kind" in config_keys(cfg)
    problems = unknown_override_keys(cfg, ["--config.learner.lrr=1", "--config.sampler.k=3", "--config.bogus=1"])
    assert problems[0].startswith("unknown config key 'learner.lrr'; did you mean learner.lr")
    assert problems[1] == "unknown config key 'bogus'"
    assert len(problems) == 2


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data")
def test_a_path_that_is_not_a_model_is_rejected_up_front(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = parse(
        f"--config.reference.path={os.path.join(ROOT, 'README.md')}",
        f"--config.learner.guide.path={tmp_path / 'empty'}",
    )
    with pytest.raises(loop.ConfigError) as e:
        loop.validate_config(cfg)
    message = str(e.value)
    assert "reference.path=" in message and "is a file but not a .gguf model" in message
    assert "learner.guide.path=" in message and "neither qsharp_config.json" in message


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data")
@pytest.mark.parametrize("preset", ["llama3_8b", "llama31_8b", "qwen2p5_7b"])
def test_paper_model_presets_name_their_checkpoints_and_how_to_convert(preset, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    cfg = parse(preset=preset)
    assert cfg.reference.dtype == "bfloat16" and cfg.sampler.k == 20 and cfg.collect.iterations == 2
    with pytest.raises(loop.ConfigError) as e:
        loop.validate_config(cfg)
    message = str(e.value)
    assert f"reference.path='{cfg.reference.path}': does not exist: convert the model there first" in message
    assert f"python -m qsharp_jax.convert --src <HF folder or .gguf> --out {cfg.learner.guide.path}" in message


def test_every_config_file_reads_without_jax():
    import subprocess
    import sys

    code = "import sys, configs.gsm8k, configs.math500, configs.arithmetic; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_arithmetic_config_problems_are_listed():
    from qsharp_jax.qsharp.job_config import validate_config

    argv = [
        "prog",
        f"--config={os.path.join(ROOT, 'configs', 'arithmetic.py')}:quick",
        "--config.arithmetic.kinds=('div',)",
    ]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    with pytest.raises(loop.ConfigError, match=r"arithmetic\.kinds=\('div',\): each entry must be one of"):
        validate_config(fv.config)


def test_resume_accepts_new_keys_and_sweep_lists_but_not_changed_values(tmp_path):
    from qsharp_jax.qsharp.job_config import ConfigError, save_effective_config

    out = str(tmp_path)
    cfg = parse()
    path = save_effective_config(cfg, out)
    with open(path) as f:
        saved = json.load(f)
    del saved["grpo"], saved["sampler"]["k"]  # as written by a version without these keys
    with open(path, "w") as f:
        json.dump(saved, f)
    save_effective_config(cfg, out)  # keys added since: their defaults, resume accepted
    save_effective_config(parse("--config.eval.inv_etas=(0.0,3.0)", "--config.grpo.lr=0.5"), out)
    with pytest.raises(ConfigError, match=r"changed: sampler.k\)"):
        save_effective_config(parse("--config.sampler.k=3"), out)
    # the GRPO job's own directory keeps the GRPO keys binding
    save_effective_config(cfg, str(tmp_path / "grpo"), free=("eval.inv_etas",))
    with pytest.raises(ConfigError, match=r"changed: grpo.lr\)"):
        save_effective_config(parse("--config.grpo.lr=0.5"), str(tmp_path / "grpo"), free=("eval.inv_etas",))
