"""The star-graph experiment: config presets, validation, and the `quick` preset end to end
(fixed seeds) with a resume that reuses every phase."""

import subprocess
import sys

import pytest

import configs.star_graph as star_config
from qsharp_jax.experiments import star_graph

from conftest import ROOT


def test_presets_import_no_jax_and_reject_unknown():
    code = (
        "import sys, configs.star_graph as c\n"
        "for p in c.PRESETS: c.get_config(p)\n"
        "assert 'jax' not in sys.modules, 'configs must stay JAX-free'\n"
        "print(c.get_config('g5_5').graph.degree, c.get_config('g3_8').graph.path_len, c.get_config().preset)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "8", "g2_5"]
    with pytest.raises(ValueError, match="unknown star-graph preset"):
        star_config.get_config("g9_9")


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(graph=dict(degree=0)), r"graph: degree=0"),
        (dict(graph=dict(path_len=30)), r"graph: .* needs 59 distinct nodes"),
        (dict(methods=("pretrained", "ppo")), r"methods: \['ppo'\]"),
        (dict(methods=("qsharp_online",)), r"qsharp_online needs qsharp"),
        (dict(data=dict(heldout=5_000, posttrain=5_000)), r"data.heldout=5000 must be below"),
        (dict(classifier=dict(init="gpt2")), r"classifier.init='gpt2'"),
    ],
)
def test_validate_config(override, message):
    cfg = star_config.get_config("quick")
    for k, v in override.items():
        if isinstance(v, dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    with pytest.raises(star_graph.ConfigError, match=message):
        star_graph.validate_config(cfg)
