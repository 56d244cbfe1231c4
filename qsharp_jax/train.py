"""The Q# job: ``python -m qsharp_jax.train --config=configs/gsm8k.py[:PRESET] [--config.key=value ...]``.

Flags in, one library call out: :func:`qsharp_jax.qsharp.loop.run` does the work (its
docstring describes the iterations and the output directory). A config with
``experiment = "star_graph"`` (``configs/star_graph.py``) runs
:func:`qsharp_jax.experiments.star_graph.run` instead, and ``--config.method=grpo`` trains GRPO
policies on the job's task (:func:`qsharp_jax.experiments.grpo_task.run`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qsharp_jax.core import multihost
from qsharp_jax.experiments import grpo_task, star_graph
from qsharp_jax.qsharp.job_config import unknown_override_keys
from qsharp_jax.qsharp.loop import ConfigError, run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml-collections config file, e.g. configs/gsm8k.py[:paper].", lock_config=True
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an override of a key the config does not have ends
    in one line naming the key and the closest valid keys instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:
        base = [a for a in argv if not a.startswith("--config.")]
        try:
            fv = flags.FlagValues()
            config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=base)
            fv(base)
            problems = unknown_override_keys(fv.config, argv) if fv.config is not None else []
        except Exception:
            problems = []  # the config file itself is broken: absl's own message says how
        if problems:
            sys.exit("error: " + "; ".join(problems))
        raise error


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file rename at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("pass --config=configs/gsm8k.py (optionally :PRESET, e.g. configs/gsm8k.py:paper).")
    try:
        # the config's distributed section, QSHARP_JAX_DISTRIBUTED (launch/worker.sh) or a TPU slice
        multihost.initialize(cfg)
        if cfg.get("experiment", "qsharp") == "star_graph":
            star_graph.run(cfg)
        elif cfg.method == "grpo":
            grpo_task.run(cfg)
        else:
            run(cfg)
    except (ConfigError, star_graph.ConfigError, multihost.DistributedConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
