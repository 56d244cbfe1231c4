"""Where the time of one same-size V-type guided decode step goes (issue 11 item 5).

    PYTHONPATH=. python bench/guided_step_profile.py --cache 208 1088 --rounds 5 --json /tmp/guided_profile.json

SmolLM2-135M-Instruct (fp32) as the reference and, as in ``decode_bench.py``, a guide on a copy
of its backbone with a V head (same size), batch 16, k = 20, T 0.8, top-p 0.9 (exact). Each
piece is its own jitted program running ``--steps`` iterations in a ``fori_loop`` (one call,
so dispatch is amortised; the caches are carried and donated like in the decode loop), timed
as the fastest of ``--rounds`` calls after a warm-up call, all pieces called in turn each
round (side by side: the machine is shared); per-iteration milliseconds:

* ``step``: the whole decode step (``engine.decode_step``: reference, top-k, guide probe,
  offsets, sampling, log-probs, KL);
* ``reference``: the reference forward of the newest token over its cache + LM head;
* ``top_k``: ``lax.top_k`` of the [16, V] reference logits (the k guidance candidates);
* ``guide_probe``: the guide forward of [newest | k candidates] over its cache (``n_write=1``)
  + V head (``engine.candidate_scores``);
* ``sampling``: tempered log-softmax (policy and reference), exact top-p, the inverse-CDF
  sample and the per-step KL from [16, V] logits;
* ``gemm``: the dense matmuls of one step alone (the same shapes and weights as the
  reference at M = 16 and the guide at M = 16 x 21), the ``decode_bench`` dense-matmul rate.

``--cache`` is the KV cache length the attention scans (the engine attends over the whole
cache, masked: prompt bucket - 1 + max_new_tokens), not the number of real tokens. FLOPs are
XLA's ``cost_analysis`` of each compiled program (its loop body: one iteration). Everything runs
inside ``core.host_memory.reuse_freed_memory`` as in the sampler (``--reuse-host-memory 0``:
glibc's default allocator, whose unmapped scratch is faulted in again every step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from run_info import run_info

from qsharp_jax.checkpoints import loader
from qsharp_jax.core import host_memory, sampling
from qsharp_jax.guidance import model as guidance_model
from qsharp_jax.models.decoder import KVCache, init_cache
from qsharp_jax.rollout import engine
from qsharp_jax.rollout.state import LoopSpec

BATCH, K = 16, 20
_GEMM: dict = {}


def filled_cache(cfg, batch: int, length: int, real: int, seed: int, block: int = 0) -> KVCache:
    """A cache of ``length`` columns whose first ``real`` hold random keys/values (masked in),
    read in blocks of ``block`` columns (0: all columns)."""
    cache = init_cache(cfg, batch, length, block=block)
    rng = np.random.default_rng(seed)
    fill = lambda x: jnp.asarray(rng.normal(0, 1, x.shape).astype(np.float32))
    mask = np.zeros((batch, length), bool)
    mask[:, :real] = True
    return KVCache(
        k=[fill(x) for x in cache.k],
        v=[fill(x) for x in cache.v],
        mask=jnp.asarray(mask),
        index=jnp.int32(real),
        block=block,
    )


def compile_program(fn, args):
    """(compiled jit(fn), XLA FLOPs). XLA's cost analysis counts a ``fori_loop`` body once
    (not times its trip count): the FLOPs of one iteration."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(compiled(*args))  # warm-up
    return compiled, float(cost.get("flops", 0.0)) if cost else 0.0


def time_round_robin(programs: dict, rounds: int) -> dict:
    """Minimum seconds per call of each compiled program, called in turn for ``rounds``
    rounds: on a shared machine the load changes over minutes, so the pieces are timed side
    by side and the fastest call (least disturbed) is kept."""
    best = {name: float("inf") for name in programs}
    for _ in range(rounds):
        for name, (compiled, args) in programs.items():
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def profile(ref, guide, cache_len: int, real: int, steps: int, rounds: int, block: int = 0) -> dict:
    cfg = ref.cfg
    ref_graph, ref_state = nnx.split(ref)
    guide_graph, guide_state = nnx.split(guide)
    spec = LoopSpec(cache_len, K, "qsharp", True)
    knobs = dict(
        temperature=jnp.float32(0.8),
        top_p=jnp.float32(0.9),
        top_k=jnp.int32(0),
        greedy=jnp.bool_(False),
        inv_eta=jnp.float32(10.0),
    )
    stop_ids = jnp.full((4,), -1, jnp.int32)
    rng = np.random.default_rng(0)
    newest = jnp.asarray(rng.integers(100, 1000, BATCH), jnp.int32)
    position = jnp.full((BATCH,), real, jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), BATCH))
    logits0 = jnp.asarray(rng.normal(0, 3, (BATCH, cfg.vocab_size)).astype(np.float32))
    res = {"cache_len": cache_len, "real_tokens": real, "steps": steps}
    programs, flops = {}, {}

    def record(name, fn, args):
        compiled, flops[name] = compile_program(fn, args)
        programs[name] = (compiled, args)

    def step_fn(ref_state, guide_state, ref_cache, guide_cache):
        r, g = nnx.merge(ref_graph, ref_state), nnx.merge(guide_graph, guide_state)

        def body(i, c):
            tok, rc, gc = c
            out = engine.decode_step(
                r, g, spec, knobs, stop_ids, jnp.int32(0), rc, gc, tok, position + i, keys,
                jnp.full((BATCH,), i), jnp.ones((BATCH,), bool),
            )  # fmt: skip
            return out[0], out[5], out[6]

        return jax.lax.fori_loop(0, steps, body, (newest, ref_cache, guide_cache))[0]

    def ref_fn(ref_state, ref_cache):
        r = nnx.merge(ref_graph, ref_state)

        def body(i, c):
            tok, rc, acc = c
            h, rc = r(tok[:, None], (position + i)[:, None], cache=rc)
            logits = r.logits(h[:, 0])
            return jnp.argmax(logits, -1).astype(jnp.int32), rc, acc + logits[:, 0]

        return jax.lax.fori_loop(0, steps, body, (newest, ref_cache, jnp.zeros((BATCH,))))[2]

    def topk_fn(logits):
        # the input must not be a loop-carried array updated in place (``lg.at[...].add``):
        # then XLA:CPU lowers top_k to a full sort (~250 ms here) instead of its TopK call
        # (~2 ms), which is what the engine's decode loop compiles to (checked in its HLO)
        def body(i, acc):
            idx = jax.lax.top_k(logits + acc[:, None].astype(jnp.float32) * 1e-9, K)[1]
            return acc + idx[:, 0]

        return jax.lax.fori_loop(0, steps, body, jnp.zeros((BATCH,), jnp.int32))

    def probe_fn(guide_state, guide_cache, logits):
        g = nnx.merge(guide_graph, guide_state)
        cands = jax.lax.top_k(logits, K)[1]

        def body(i, c):
            tok, gc, acc = c
            out, gc = engine.candidate_scores(g, gc, tok, position + i, cands)
            offset = engine.guidance_offsets(g, out, "qsharp", knobs["inv_eta"])
            gc = engine._wrap(gc)
            return cands[:, i % K], gc, acc + offset[:, 0]

        return jax.lax.fori_loop(0, steps, body, (newest, guide_cache, jnp.zeros((BATCH,))))[2]

    def sampling_fn(logits):
        def body(i, c):
            lg, acc = c
            log_ref = sampling.reference_log_probs(lg, knobs["temperature"])
            log_pi = sampling.policy_log_probs(lg, log_ref, knobs["temperature"], knobs["top_p"], 0, False)
            step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.full((BATCH,), i))
            token = jax.vmap(lambda k, lp: sampling.sample(k, lp[None])[0])(step_keys, log_pi)
            kl = sampling.kl_divergence(log_pi, log_ref)
            return lg.at[:, 0].add(kl * 1e-9), acc + token

        return jax.lax.fori_loop(0, steps, body, (logits, jnp.zeros((BATCH,), jnp.int32)))[1]

    ref_cache = filled_cache(cfg, BATCH, cache_len, real, 1, block)
    guide_cache = filled_cache(guide.cfg, BATCH, cache_len, real, 2, block)
    record("step", step_fn, (ref_state, guide_state, ref_cache, guide_cache))
    record("reference", ref_fn, (ref_state, ref_cache))
    record("top_k", topk_fn, (logits0,))
    record("guide_probe", probe_fn, (guide_state, guide_cache, logits0))
    record("sampling", sampling_fn, (logits0,))
    if "gemm" not in _GEMM:  # the same program for every cache length
        _GEMM["gemm"] = gemm_program(ref, guide, steps)
    programs["gemm"], flops["gemm"] = _GEMM["gemm"]
    for name, sec in time_round_robin(programs, rounds).items():
        res[name] = {"ms": 1e3 * sec / steps, "gflop": flops[name] / 1e9, "gflop_s": flops[name] * steps / sec / 1e9}
        print(
            f"  cache {cache_len:5d} {name:12s} {res[name]['ms']:8.1f} ms  {res[name]['gflop']:7.2f} GFLOP "
            f" {res[name]['gflop_s']:6.1f} GFLOP/s",
            flush=True,
        )
    parts = ("reference", "top_k", "guide_probe", "sampling")
    res["sum_of_parts_ms"] = sum(res[p]["ms"] for p in parts)
    res["rest_ms"] = res["step"]["ms"] - res["sum_of_parts_ms"]
    return res


def gemm_program(ref, guide, steps: int):
    """((compiled, args), FLOPs per iteration) of the step's dense matmuls alone: the
    reference's projections + LM head at M = 16, the guide's projections at M = 16 x (1 + k)
    (``decode_bench.matmul_rate``'s shapes)."""

    def weights(model):
        for block in model.layers:
            a, m = block.attn, block.mlp
            e = a.wq.get_value().shape[0]
            yield from (a.wq.get_value().reshape(e, -1), a.wk.get_value().reshape(e, -1))
            yield from (a.wv.get_value().reshape(e, -1), a.wo.get_value().reshape(-1, e))
            yield from (m.gate.get_value(), m.up.get_value(), m.down.get_value())

    shapes = [(w, BATCH) for w in list(weights(ref)) + [ref.lm_head_kernel()]]
    shapes += [(w, BATCH * (1 + K)) for w in weights(guide.backbone)]
    ws = [w for w, _ in shapes]

    def fn(ws):
        def body(i, acc):
            for w, (_, rows) in zip(ws, shapes):
                x = jnp.full((rows, w.shape[0]), 1e-3, w.dtype) + acc
                acc = acc + jnp.sum(x @ w) * 1e-9
            return acc

        return jax.lax.fori_loop(0, steps, body, jnp.zeros((), jnp.float32))

    compiled, _ = compile_program(fn, (ws,))
    return (compiled, (ws,)), sum(2 * rows * w.shape[0] * w.shape[1] for w, rows in shapes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=int, nargs="+", default=[208, 1088])
    ap.add_argument("--real", type=int, default=128, help="real (masked-in) tokens in the caches")
    ap.add_argument(
        "--attention-block", type=int, nargs="+", default=[0],
        help="KV cache read in blocks of this many columns, skipping empty ones (0: every column)",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reuse-host-memory", type=int, choices=(0, 1), default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    info = run_info(reuse_host_memory=bool(args.reuse_host_memory and host_memory.available()))
    print(json.dumps(info), flush=True)
    ref = loader.load("smollm2", dtype=jnp.float32).model
    guide = guidance_model.build(nnx.clone(ref), guidance_model.HeadConfig(kind="v", init="normal"), seed=1234)
    results = {"info": info, "by_cache": []}
    scope = host_memory.reuse_freed_memory if args.reuse_host_memory else contextlib.nullcontext
    for c, block in [(c, b) for c in args.cache for b in args.attention_block]:
        with scope():
            r = profile(ref, guide, c, min(args.real, c - args.steps - 1), args.steps, args.rounds, block)
        r["attention_block"] = block
        r["step_over_gemm_rate"] = r["step"]["gflop_s"] / r["gemm"]["gflop_s"]
        r["gemm_ms_over_step_ms"] = r["gemm"]["ms"] / r["step"]["ms"]
        print(
            f"  cache {c}, block {block}: step {r['step']['ms']:.1f} ms = parts {r['sum_of_parts_ms']:.1f} "
            f"+ rest {r['rest_ms']:.1f}; "
            f"GEMM time / step time {r['gemm_ms_over_step_ms']:.2f}",
            flush=True,
        )
        results["by_cache"].append(r)
    info["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
