"""Size a Q# run for a TPU topology: ``python -m qsharp_jax.plan --config=configs/gsm8k.py:paper
--topology=v5e-8 --reference=llama-3-8b --guide=llama-3.2-1b``.

Prints bytes per device (weights, KV caches, activations, optimizer state) of prefill, the
guided decode loop and the learner's train step, from the analytic model and, with libtpu
installed, from the programs compiled for the topology, side by side, plus roofline step
times. Flags in, one library call out (:mod:`qsharp_jax.distributed.planner`).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from qsharp_jax.distributed import aot, planner, topologies
from qsharp_jax.models import presets

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml-collections config file, e.g. configs/gsm8k.py:paper.")
_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: {', '.join(topologies.TOPOLOGIES)} or v5e:2x4 etc.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "reference architecture: preset name or HF folder (default: config)"
)
_GUIDE = flags.DEFINE_string("guide", None, "guide backbone architecture (default: learner.guide.path of the config)")
_MESH = flags.DEFINE_enum(
    "mesh", "preset", ["preset", "config"], "preset: the topology's sampling/learning meshes; config: cfg.mesh for both"
)
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 256, "longest prompt (tokens) before bucketing")
_PROGRAMS = flags.DEFINE_list("programs", list(aot.PROGRAMS), "programs to plan: prefill, decode, train_step")
_ANALYTIC_ONLY = flags.DEFINE_bool("analytic_only", False, "skip compiling (also the behaviour without libtpu)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _TOPOLOGY.value is None:
        raise app.UsageError("pass --config=configs/gsm8k.py:paper and --topology=v5e-8 (or v5e:2x4).")
    try:
        report = planner.plan_config(
            _CONFIG.value,
            _TOPOLOGY.value,
            reference=presets.get(_REFERENCE.value) if _REFERENCE.value else None,
            guide=presets.get(_GUIDE.value) if _GUIDE.value else None,
            mesh=_MESH.value,
            prompt_length=_PROMPT_LENGTH.value,
            compile=not _ANALYTIC_ONLY.value,
            programs=_PROGRAMS.value,
        )
    except (topologies.TopologyError, planner.PlanError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(report)


if __name__ == "__main__":
    app.run(main)
