"""notebooks/qsharp_demo.ipynb runs top to bottom on a CPU (its small setting) with nbclient,
and its outputs are real: generated text, a Q# run's summary, an accuracy-vs-KL plot."""

from __future__ import annotations

import base64
import json
import math
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "qsharp_demo.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cell_with_tag(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):

    out_dir = tmp_path / "demo"
    monkeypatch.setenv("QSHARP_DEMO_OUTPUT", str(out_dir))  # the kernel inherits this environment
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("QSHARP_DEMO_SMALL", raising=False)  # the backend alone must pick the small setting
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    )
    start = time.time()
    client.execute()
    seconds = time.time() - start
    print(f"notebook CPU run: {seconds:.0f}s")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    setup = stdout_of(cell_with_tag(nb, "setup"))
    assert "backend cpu" in setup and "small setting" in setup

    results = json.loads((out_dir / "demo_results.json").read_text())
    assert results["backend"] == "cpu" and results["setting"]["new_tokens"] == 16

    # guided generation: pi_ref, then eta 1 and the control's eta, each with text and a KL
    generated = stdout_of(cell_with_tag(nb, "generate"))
    gens = results["generations"]
    assert [g["eta"] for g in gens] == [None, 1.0, 0.1]
    for g in gens:
        assert g["text"].strip() and g["text"].strip() in generated
        assert 1 <= g["tokens"] <= 16 and math.isfinite(g["kl"]) and g["kl"] >= 0
    assert "--- π_ref:" in generated and "--- guided, η=0.1:" in generated
    # the guide re-weights the candidates: the guided policy is further from pi_ref than pi_ref's own
    # top-p truncation (the only source of pi_ref's KL)
    assert gens[2]["kl"] > gens[0]["kl"]

    # the short Q# run: collected, trained, evaluated; its summary table printed
    qsharp = stdout_of(cell_with_tag(nb, "qsharp"))
    assert "pi_ref" in qsharp and "qsharp_iter1" in qsharp and "pass@1" in qsharp
    run_dir = out_dir / "qsharp_run"
    assert (run_dir / "summary.json").is_file() and (run_dir / "rollouts").is_dir()
    assert any((run_dir / "guide" / "iteration_1").iterdir())
    assert set(results["qsharp"]) == {"pi_ref", "qsharp_iter1"}
    assert results["qsharp"]["qsharp_iter1"]["num_problems"] == 2

    # accuracy vs KL: pi_ref and three etas, finite numbers, a PNG shown inline and saved
    points = results["points"]
    assert [p["eta"] for p in points] == [None, 1.0, 0.3, 0.1]
    for p in points:
        assert 0.0 <= p["accuracy"] <= 1.0 and math.isfinite(p["kl"]) and p["kl"] >= 0
    assert points[-1]["kl"] > points[0]["kl"]
    pngs = [o.data["image/png"] for o in cell_with_tag(nb, "plot").outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]).startswith(PNG_MAGIC)
    saved = (out_dir / "accuracy_vs_kl.png").read_bytes()
    assert saved.startswith(PNG_MAGIC) and len(saved) > 5000
