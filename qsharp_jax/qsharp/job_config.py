"""The Q# job's config: every value checked before anything is loaded (all problems listed
in one error), model paths that are not models rejected, the effective config saved beside
the run (a resumed run must use the same one)."""

from __future__ import annotations

import difflib
import json
import math
import os

import ml_collections

from qsharp_jax.checkpoints.files import QSHARP_CONFIG
from qsharp_jax.guidance import learner as learner_lib
from qsharp_jax.tasks import catalog, data, grading

CONFIG_FILE = "config.json"
DTYPES = ("float32", "bfloat16")
METHODS = ("qsharp", "cd")  # guided policies of the evaluation sweep (pi_ref is always evaluated)
# Keys a resumed Q# run may change: each sweep point is saved under its own name (method,
# 1/eta), so a new list only adds (or leaves out) points, and the GRPO keys belong to the GRPO
# job (which checks its own config under output_dir/grpo); every other key changes what was computed.
EXTENDABLE = ("eval.inv_etas", "eval.methods")
PLACEMENT_KEYS = ("distributed",)  # where the processes meet (a multi-host rerun may get another port)
QSHARP_RESUME_FREE = EXTENDABLE + PLACEMENT_KEYS + ("method", "grpo")
JOB_METHODS = ("qsharp", "grpo")  # what the job trains: Algorithm 1's guide, or GRPO policies


class ConfigError(ValueError):
    """A config value that cannot work; raised before any model is loaded."""


# ---- config ---------------------------------------------------------------------------------


def model_path(path: str) -> str | None:
    """Loader path; "" means the default reference model (SmolLM2)."""
    return path or None


def model_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a model for the loader (None when it can): "" is the default
    SmolLM2; otherwise a converted dir, an HF folder (config.json) or a .gguf file."""
    if not path:
        return None
    if not os.path.exists(path):
        return (
            "does not exist: convert the model there first (python -m qsharp_jax.convert --src <HF folder or "
            f".gguf> --out {path}) or point the key at an existing model"
        )
    if os.path.isfile(path):
        return None if path.endswith(".gguf") else "is a file but not a .gguf model"
    if os.path.isfile(os.path.join(path, QSHARP_CONFIG)) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    return (
        "is a folder with neither qsharp_config.json (python -m qsharp_jax.convert output) nor an HF "
        "config.json: point it at a converted model, an HF model folder or a .gguf file"
    )


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError listing every bad value (checked before anything is loaded)."""
    bad: list[str] = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = value[part]
            bad.append(f"{key}={value!r}: {why}")

    def positive_int(key: str, allow_all: bool = False) -> None:
        section, name = key.split(".")
        v = cfg[section][name]
        ok = isinstance(v, int) and (v >= 1 or (allow_all and v == -1))
        need(ok, key, "must be a positive integer" + (" (or -1 for all)" if allow_all else ""))

    need(cfg.method in JOB_METHODS, "method", f"must be one of {JOB_METHODS}")
    d = cfg.data
    need(d.answer_format in data.ANSWER_FORMATS, "data.answer_format", f"must be one of {data.ANSWER_FORMATS}")
    need(d.matcher in grading.MATCHERS, "data.matcher", f"must be one of {grading.MATCHERS}")
    need(d.answer_extraction in grading.EXTRACTIONS, "data.answer_extraction", f"must be one of {grading.EXTRACTIONS}")
    need(d.eval_split in ("test", "validation"), "data.eval_split", "must be 'test' or 'validation'")
    need(0.0 < d.validation_fraction < 1.0, "data.validation_fraction", "must be in (0, 1)")
    positive_int("data.num_train_problems", allow_all=True)
    positive_int("data.num_eval_problems", allow_all=True)
    need(cfg.task in catalog.TASKS, "task", f"must be one of {catalog.TASKS}")
    if cfg.task in catalog.FILE_TASKS:
        files = [("data.train_file", d.train_file)]
        files += [("data.eval_file", d.eval_file)] if d.eval_split == "test" else []
        for key, name in files:
            path = catalog.data_path(cfg, name)
            why = f"no such file {path} (data.dir={d.dir!r} is relative to the repository root)"
            need(os.path.isfile(path), key, why)
    elif cfg.task == "arithmetic":
        try:
            catalog.from_config(cfg)
        except ValueError as e:
            bad.append(str(e))

    for key, path in (("reference.path", cfg.reference.path), ("learner.guide.path", cfg.learner.guide.path)):
        problem = model_path_problem(path)
        need(problem is None, key, problem or "")
    need(cfg.reference.dtype in DTYPES, "reference.dtype", f"must be one of {DTYPES}")

    s = cfg.sampler
    positive_int("sampler.max_new_tokens")
    positive_int("sampler.k")
    positive_int("sampler.problems_per_batch")
    positive_int("sampler.prompt_bucket")
    need(s.temperature > 0 and math.isfinite(s.temperature), "sampler.temperature", "must be > 0")
    need(0.0 < s.top_p <= 1.0, "sampler.top_p", "must be in (0, 1]")
    need(s.guidance in ("qsharp", "cd"), "sampler.guidance", "must be 'qsharp' or 'cd'")

    positive_int("collect.samples_per_problem")
    positive_int("collect.iterations")
    positive_int("collect.problems_per_shard")
    need(cfg.collect.rollin_inv_eta >= 0, "collect.rollin_inv_eta", "must be >= 0")
    need(cfg.collect.max_length == -1 or cfg.collect.max_length >= 2, "collect.max_length", "must be -1 or >= 2")

    positive_int("eval.samples_per_problem")
    positive_int("eval.pass_at_1_rounds")
    need(cfg.eval.inv_eta >= 0, "eval.inv_eta", "must be >= 0")
    etas = tuple(cfg.eval.inv_etas)
    need(
        all(isinstance(x, int | float) and x >= 0 for x in etas),
        "eval.inv_etas",
        "must be numbers >= 0 (0: the control without value information, pi_ref on the top-k candidates)",
    )
    need(set(cfg.eval.methods) <= set(METHODS), "eval.methods", f"must be a subset of {METHODS}")
    need(bool(cfg.output_dir), "output_dir", "must be set")

    m = cfg.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    if not all(isinstance(x, int) and (x >= 1 or x == -1) for x in sizes) or sizes.count(-1) > 1:
        bad.append(f"mesh={dict(m)}: sizes must be positive integers, at most one of them -1")
    elif num_devices is not None:
        known = math.prod(x for x in sizes if x != -1)
        fits = num_devices % known == 0 if -1 in sizes else known == num_devices
        if not fits:
            bad.append(
                f"mesh={dict(m)}: data x fsdp x tensor must equal the {num_devices} available devices "
                "(set one axis to -1 to use the rest)"
            )
        else:  # training batches are split over data x fsdp: catch it now, not after collecting
            resolved = [num_devices // known if x == -1 else x for x in sizes]
            shards = resolved[0] * resolved[1]
            if isinstance(cfg.learner.batch_size, int) and cfg.learner.batch_size % shards:
                bad.append(
                    f"learner.batch_size={cfg.learner.batch_size}: must be a multiple of mesh data x fsdp = {shards}"
                )
    try:
        learner_lib.validate_learner_config(cfg.learner)
    except ValueError as e:
        bad.append(str(e))
    if bad:
        raise ConfigError("invalid config:\n  " + "\n  ".join(bad))


def save_effective_config(cfg: ml_collections.ConfigDict, output_dir: str, free: tuple = QSHARP_RESUME_FREE) -> str:
    """Write the config this run uses; a resumed run must use the same one, except for the
    keys (or sections) in ``free``."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_FILE)
    text = cfg.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = _diff_keys(old, json.loads(text), skip_new=True)
        changed = sorted(k for k in diff if not any(k == f or k.startswith(f + ".") for f in free))
        if changed:
            raise ConfigError(
                f"{output_dir} holds a run with a different config (changed: {', '.join(changed)}); "
                "use a new output_dir or restore the old values."
            )
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def _diff_keys(a, b, prefix="", skip_new=False):
    """Dotted keys whose values differ. With ``skip_new``, keys that only ``b`` has are not
    differences: they were added to the config after ``a`` was saved (a user cannot add keys),
    so a run started by an older version resumes with their defaults."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in (set(a) | set(b)) - (set(b) - set(a) if skip_new else set()):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.", skip_new)
    elif a != b:
        yield prefix.rstrip(".")


def config_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config."""
    out = []
    for k, v in cfg.items():
        out += config_keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
    return out


def unknown_override_keys(cfg, argv) -> list[str]:
    """One message per ``--config.KEY=...`` argument whose KEY the config does not have,
    naming the closest valid keys."""
    keys = config_keys(cfg)
    messages = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if key in keys or any(k.startswith(key + ".") for k in keys):
            continue
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if not close:  # a wrong section: suggest the keys of the sections with that last name
            close = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        messages.append(f"unknown config key {key!r}{hint}")
    return messages
