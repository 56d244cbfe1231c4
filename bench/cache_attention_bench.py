"""What a decode step costs as the KV cache fills: dense vs blocked cache attention, with and
without reusing freed host memory, side by side in one process (issue 11).

    PYTHONPATH=. python bench/cache_attention_bench.py --batch 64 --cache 703 --filled 200 450 690 \
        --json docs/cache_attention_bench.json

One reference decode step of SmolLM2-135M-Instruct (fp32): the newest token of every row
through the model over its KV cache + LM head + argmax, ``--steps`` of them in one jitted
``fori_loop`` (cache carried), timed as the fastest of ``--rounds`` calls; the block sizes of
one fill level are called in turn each round. Every fill level is measured without host memory
reuse first, then all of them again inside one reuse scope: glibc cannot go back to its dynamic
mmap threshold once ``mallopt`` has set one, so the default allocator is only seen before the
process first enters the scope. The cache has ``--cache`` columns (the engine's capacity: prompt
bucket - 1 + max new tokens; 703 = a 192-token prompt bucket + 512), of which the first
``filled`` hold random K/V (masked in). Variants:

* ``attention_block`` 0 (every column, masked) or 128 (``KVCache.block``: only blocks that
  hold tokens, while they are at most 3/4 of the cache);
* host memory reused (``core.host_memory.reuse_freed_memory``, what the sampler does) or
  glibc's default (large freed blocks unmapped, so the next step faults them in again).

Prints ms per step, minor page faults per step (as GB of 4 KiB pages) and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from qsharp_jax.checkpoints import loader
from qsharp_jax.core import host_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guided_step_profile import filled_cache
from run_info import run_info


def step_program(model, batch: int, steps: int):
    graph, _ = nnx.split(model)

    def run(state, cache, newest, position):
        m = nnx.merge(graph, state)

        def body(i, carry):
            token, cache, acc = carry
            h, cache = m(token[:, None], (position + i)[:, None], cache=cache)
            logits = m.logits(h[:, 0])
            return jnp.argmax(logits, -1).astype(jnp.int32), cache, acc + logits[:, 0]

        return jax.lax.fori_loop(0, steps, body, (newest, cache, jnp.zeros((batch,))))[2]

    return run


def timed_call(compiled, args) -> tuple[float, int]:
    """(seconds, minor page faults) of one call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache", type=int, default=703)
    ap.add_argument("--filled", type=int, nargs="+", default=[200, 450, 690])
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 128])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if 0 not in args.blocks:
        ap.error("--blocks must include 0 (the dense pass every ratio is taken against)")
    if not host_memory.available():
        print("note: host memory reuse is not available here (not glibc, or switched off): both rows are the same")
    info = run_info(args)
    print(json.dumps(info), flush=True)
    model = loader.load("smollm2", dtype=jnp.float32).model
    _, state = nnx.split(model)
    run = step_program(model, args.batch, args.steps)
    newest = jnp.arange(args.batch, dtype=jnp.int32) + 100
    rows = []
    # the cache's shape does not depend on how full it is: one program per block size
    position0 = jnp.zeros((args.batch,), jnp.int32)
    programs = {}
    for block in args.blocks:
        cache = filled_cache(model.cfg, args.batch, args.cache, 1, seed=1, block=block)
        programs[block] = jax.jit(run).lower(state, cache, newest, position0).compile()
    best = {}
    for reuse in (False, True):  # without reuse first: see the module docstring
        with host_memory.reuse_freed_memory() if reuse else contextlib.nullcontext():
            for filled in args.filled:
                real = min(filled, args.cache - args.steps - 1)
                position = jnp.full((args.batch,), real, jnp.int32)
                calls = {}
                for block in args.blocks:
                    cache = filled_cache(model.cfg, args.batch, args.cache, real, seed=1, block=block)
                    calls[block] = (state, cache, newest, position)
                    timed_call(programs[block], calls[block])  # warm-up (with reuse: the heap grows once)
                    best[(real, block, reuse)] = (float("inf"), 0)
                for _ in range(args.rounds):
                    for block, call_args in calls.items():
                        sec, faults = timed_call(programs[block], call_args)
                        if sec < best[(real, block, reuse)][0]:
                            best[(real, block, reuse)] = (sec, faults)
                del calls
    for real in sorted({k[0] for k in best}):
        for (r, block, reuse), (sec, faults) in best.items():
            if r != real:
                continue
            row = dict(
                filled=real,
                attention_block=block,
                reuse_host_memory=reuse,
                ms_per_step=1e3 * sec / args.steps,
                fault_gb_per_step=faults * 4096 / 1e9 / args.steps,
            )
            rows.append(row)
            print(
                f"  filled {real:4d}/{args.cache} block {block:3d} reuse {int(reuse)}: "
                f"{row['ms_per_step']:7.1f} ms/step, page faults {row['fault_gb_per_step']:.2f} GB/step",
                flush=True,
            )
        base = best[(real, 0, False)][0]
        for (r, block, reuse), (sec, _) in best.items():
            if r == real and (block, reuse) != (0, False):
                print(f"  filled {real:4d}: block {block} reuse {int(reuse)} is {base / sec:.2f}x block 0 reuse 0")
    info["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
