"""GGUF reading: the q/k un-permutation, and a tiny Llama written as GGUF (permuted q/k,
some Q8_0 tensors, a byte-level tokenizer) converted on the torch-free main path with
8 fake devices, against transformers' own GGUF loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qsharp_jax.checkpoints.gguf import unpermute_qk

from conftest import ROOT, hf_logits, left_padded_batch


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows, written here independently of gguf_io:
    per head, rows [first half | second half] become interleaved pairs (h0, h1, h0, h1, ...)."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        block = w[h * d : (h + 1) * d]
        out[h * d : (h + 1) * d][0::2] = block[: d // 2]
        out[h * d : (h + 1) * d][1::2] = block[d // 2 :]
    return out


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 8, 16), (3, 64, 5), (2, 4, None), (1, 2, 3)])
def test_unpermute_qk_round_trip(n_head, head_dim, cols):
    rng = np.random.default_rng(0)
    shape = (n_head * head_dim,) if cols is None else (n_head * head_dim, cols)  # bias or weight
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = llamacpp_permute(w, n_head)
    if head_dim > 2:  # head_dim 2 permutes to itself
        assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


def test_unpermute_qk_small_example():
    # one head, head_dim 4: rotate-half rows (x0, x1 | y0, y1) are stored as (x0, y0, x1, y1)
    stored = np.array([10, 20, 11, 21], np.float32)
    np.testing.assert_array_equal(unpermute_qk(stored, 1), [10, 11, 20, 21])


# HF -> GGUF tensor names, spelled out independently of gguf_io's table.
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def write_gguf(hf_folder: str, path: str, arch: str = "llama", quantize_mlp: bool = True) -> None:
    """A llama.cpp-style GGUF of a tiny HF model: q/k permuted for ``llama`` (llama.cpp runs
    Qwen with rotate-half RoPE, so those stay as they are), MLP weights in Q8_0."""
    import gguf
    from safetensors.numpy import load_file
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with open(os.path.join(hf_folder, "config.json")) as f:
        c = json.load(f)
    tensors = load_file(os.path.join(hf_folder, "model.safetensors"))
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(bytes_to_unicode().values()))  # 256 single-byte tokens
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_chat_template(CHAT_TEMPLATE)
    for name, x in tensors.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_GGUF_LAYER[rest]}"
        else:
            gname = _GGUF_GLOBAL[name]
        if arch != "llama":
            pass
        elif name.endswith("q_proj.weight"):
            x = llamacpp_permute(x, c["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            x = llamacpp_permute(x, c["num_key_value_heads"])
        if quantize_mlp and ".mlp." in name:  # exercise dequantization
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Runs in a fresh interpreter where `import torch` fails and transformers believes torch is
# absent, with 8 fake CPU devices: convert the GGUF onto a (1, 4, 2) mesh, restore, forward.
_TORCH_FREE = textwrap.dedent("""
    import importlib.util, sys
    _find_spec = importlib.util.find_spec
    def _no_torch(name, package=None):
        return None if name.split(".")[0] == "torch" else _find_spec(name, package)
    importlib.util.find_spec = _no_torch
    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, _BlockTorch())

    import jax, numpy as np
    from flax import nnx
    from qsharp_jax import convert
    from qsharp_jax.checkpoints import loader
    from qsharp_jax.models import decoder as model
    from qsharp_jax.core import sharding
    src, out, batch = sys.argv[1:4]
    assert len(jax.devices()) == 8
    assert convert.main(["--src", src, "--out", out, "--mesh", "1,4,2"]) == 0
    mesh = sharding.make_mesh(1, 4, 2)
    lm = loader.load(out, mesh=mesh)
    spec = lm.model.layers[0].attn.wq.get_value().sharding.spec
    assert tuple(spec) == ("fsdp", "tensor", None), spec
    tok = lm.tokenizer
    assert tok.decode(tok("hello")["input_ids"]) == "hello"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<user>hi\\n", repr(chat)
    data = np.load(batch)
    graphdef, state = nnx.split(lm.model)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda s, t, m: model.forward_logits(nnx.merge(graphdef, s), t, m))(
            state, data["tokens"], data["mask"])
    np.save(out + "_logits.npy", np.asarray(logits))
    direct = loader.load(src, mesh=mesh)  # straight from the .gguf, no Orbax step
    for a, b in zip(jax.tree.leaves(nnx.state(direct.model, nnx.Param)), jax.tree.leaves(state)):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))
    assert "torch" not in sys.modules, "the GGUF main path imported torch"
    print("OK")
""")


def test_tiny_gguf_torch_free_sharded_matches_transformers(tiny_hf_models, tmp_path):
    gguf_path = str(tmp_path / "tiny-llama.gguf")
    write_gguf(tiny_hf_models("llama"), gguf_path)
    tokens, mask = left_padded_batch(256, lengths=(40, 23, 1))
    np.savez(tmp_path / "batch.npz", tokens=tokens, mask=mask)
    out = str(tmp_path / "orbax")
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, gguf_path, out, str(tmp_path / "batch.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = np.load(out + "_logits.npy")
    # transformers' own GGUF reader (dequantize + un-permute) is the reference.
    ref = hf_logits(str(tmp_path), tokens, mask, gguf_file="tiny-llama.gguf")
    err = float(np.abs(ours - ref)[mask].max())
    print(f"tiny GGUF llama max abs logit error: {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_gguf_matches_transformers(arch, tiny_hf_models, tmp_path):
    """Qwen GGUFs: q/k/v biases (qwen2), q/k norms and head_dim != hidden/heads (qwen3)."""
    from qsharp_jax.checkpoints import loader
    from qsharp_jax.models.config import load_hf_config
    from qsharp_jax.models.decoder import forward_logits

    name = f"tiny-{arch}.gguf"
    # transformers' GGUF reader ignores qwen3's attention.key_length (head_dim 24 here), so for
    # qwen3 the reference is the original HF folder and the GGUF stays unquantized.
    write_gguf(tiny_hf_models(arch), str(tmp_path / name), arch=arch, quantize_mlp=arch == "qwen2")
    lm = loader.load(str(tmp_path / name))
    assert lm.config.qkv_bias == (arch == "qwen2") and lm.config.qk_norm == (arch == "qwen3")
    assert lm.config == load_hf_config(tiny_hf_models(arch)).replace(
        max_position_embeddings=lm.config.max_position_embeddings, eos_token_ids=lm.config.eos_token_ids
    )
    tokens, mask = left_padded_batch(256, lengths=(20, 9, 1))
    ours = np.asarray(forward_logits(lm.model, tokens, mask))
    if arch == "qwen3":
        ref = hf_logits(tiny_hf_models(arch), tokens, mask)
    else:
        ref = hf_logits(str(tmp_path), tokens, mask, gguf_file=name)
    assert float(np.abs(ours - ref)[mask].max()) < 1e-4
