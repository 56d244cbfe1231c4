"""Training throughput on CPU: our JAX learner vs a plain PyTorch + transformers loop.

Both sides train the same SmolLM2-135M-shaped guidance model (Llama: 30 layers, hidden 576,
MLP 1536, 9 heads / 3 kv heads, vocab 49152, tied embeddings, RoPE theta 1e5; random weights:
they do not matter for speed) with a V-type Bernoulli head (Linear 576 -> 1, no bias), BCE on
the target positions (mean per sequence, then over the batch), AdamW (lr 2e-5, weight decay
0.01) and global-norm clipping at 5, on the same batch size and sequence length for the same
number of steps. Reported: non-pad tokens per second over the timed steps (the first
``--warmup`` steps, which include compilation, are not timed).

The JAX side runs the real entry point, ``learner.fit`` (host batching, jitted step, per-step
NaN check) and times every step except those that compiled; the torch side times the steps
after ``--warmup``. Both compute in float32 by default (same precision: bfloat16 matmuls are
slower than float32 on CPU); ``--jax-dtype bfloat16`` is the learner's TPU setting (float32
master weights and AdamW state either way), ``--torch-dtype bfloat16`` uses CPU autocast. Run:

    python bench/train_bench.py                       # full size (slow on 2 cores)
    python bench/train_bench.py --layers 2 --batch 2 --seq 32 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_examples(n, seq, vocab, seed=0):
    """Rows of exactly ``seq`` tokens (half prefix, half target), so there is no padding."""
    from qsharp_jax.guidance.batching import Example

    rng = np.random.default_rng(seed)
    half = seq // 2
    return [
        Example(
            rng.integers(0, vocab, half).tolist(),
            rng.integers(0, vocab, seq - half).tolist(),
            float(rng.integers(0, 2)),
        )
        for _ in range(n)
    ]


def smollm2(num_layers: int):
    """SmolLM2-135M's architecture (the library's preset) with ``num_layers`` blocks."""
    from qsharp_jax.models import presets

    return presets.get("smollm2-135m").replace(num_layers=num_layers)


def bench_jax(args, cfg):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qsharp_jax.config import learner_defaults
    from qsharp_jax.guidance import learner, model as guidance_model
    from qsharp_jax.models import decoder as model

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.jax_dtype]
    # One jitted init instead of one small compile per parameter shape.
    guide = nnx.jit(
        lambda: guidance_model.build(
            model.build(cfg, dtype=dtype, param_dtype=jnp.float32), guidance_model.HeadConfig()
        )
    )()
    c = learner_defaults()
    c.update(
        dict(
            lr=2e-5,
            weight_decay=0.01,
            clip=5.0,
            batch_size=args.batch,
            epochs=1,
            max_steps=args.warmup + args.steps,
            buckets=(args.seq,),
            compute_dtype=args.jax_dtype,
            log_every=10**9,
            progress_bar=False,
            remat=False,
        )
    )
    examples = synthetic_examples(args.batch * (args.warmup + args.steps), args.seq, cfg.vocab_size)
    t0 = time.perf_counter()
    result = learner.fit(guide, examples, c, mesh=None)
    total = time.perf_counter() - t0
    # fit times every step after the first; report the steps after the warmup ones.
    return dict(
        tokens_per_s=result.tokens_per_s,
        total_seconds=total,
        devices=jax.device_count(),
        compute_dtype=args.jax_dtype,
        params=cfg.num_params() + cfg.hidden_size,
    )


def bench_torch(args, cfg):
    import torch
    import transformers

    from qsharp_jax.models.config import to_hf_dict

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**dict(to_hf_dict(cfg), max_position_embeddings=max(2048, args.seq)))
    backbone = transformers.LlamaForCausalLM(hf).model  # the LM head is replaced by the value head
    head = torch.nn.Linear(cfg.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)
    examples = synthetic_examples(args.batch * (args.warmup + args.steps), args.seq, cfg.vocab_size)
    autocast = args.torch_dtype == "bfloat16"

    def batch(i):
        rows = examples[i * args.batch : (i + 1) * args.batch]
        ids = torch.tensor([r.input_ids + r.target_ids for r in rows])
        loss_mask = torch.zeros(ids.shape, dtype=torch.float32)
        loss_mask[:, len(rows[0].input_ids) :] = 1.0
        return ids, loss_mask, torch.tensor([r.reward for r in rows])

    def step(i):
        ids, loss_mask, reward = batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            logits = head(h).squeeze(-1).float()
        per_pos = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, reward[:, None].expand_as(logits), reduction="none"
        )
        loss = ((per_pos * loss_mask).sum(1) / loss_mask.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        return loss.detach().item()

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    t1 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    timed = time.perf_counter() - t1
    return dict(
        tokens_per_s=args.batch * args.seq * args.steps / timed,
        total_seconds=time.perf_counter() - t0,
        threads=torch.get_num_threads(),
        compute_dtype=args.torch_dtype,
        params=sum(p.numel() for p in params),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed torch steps (JAX skips its compiling step)")
    p.add_argument("--layers", type=int, default=30, help="SmolLM2-135M's 30 blocks; fewer for a smoke test")
    p.add_argument("--jax-dtype", choices=("bfloat16", "float32"), default="float32")
    p.add_argument("--torch-dtype", choices=("bfloat16", "float32"), default="float32")
    p.add_argument("--only", choices=("jax", "torch"), default=None)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the JAX side's first step compiles)")
    cfg = smollm2(args.layers)
    out = dict(settings=vars(args))
    if args.only in (None, "jax"):
        out["jax"] = bench_jax(args, cfg)
        print("jax  ", json.dumps(out["jax"]), flush=True)
    if args.only in (None, "torch"):
        out["torch"] = bench_torch(args, cfg)
        print("torch", json.dumps(out["torch"]), flush=True)
    if "jax" in out and "torch" in out:
        out["jax_over_torch"] = out["jax"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
        print(
            f"JAX {out['jax']['tokens_per_s']:.0f} tok/s ({args.jax_dtype}) vs torch "
            f"{out['torch']['tokens_per_s']:.0f} tok/s ({args.torch_dtype}): {out['jax_over_torch']:.2f}x"
        )
    return out


if __name__ == "__main__":
    main()
