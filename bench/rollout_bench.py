"""Rollout throughput at RL scale (issue 11): static batching vs continuous batching vs
transformers ``generate``, side by side in one process, on SmolLM2-135M-Instruct's own answers
to GSM8K test prompts (natural stops at EOS, capped at ``--max-new`` tokens).

    PYTHONPATH=. python bench/rollout_bench.py --batches 16 64 --hf --json /tmp/rollout_bench.json

For each batch size B the workload is ``--rows-per-slot`` x B rows: ``--n`` samples of each of
the first GSM8K test prompts (chat template), T 0.8, top-p 0.9 (exact), one key per row.

* static: our engine, one call per B rows (B / n prompts); each call decodes until its
  longest row stops (the engine exits early when every row stopped).
* continuous: our engine with B decode slots; one call for all rows; rows that stop are
  replaced by pending rows between segments of ``--segment`` steps.
* transformers: ``model.generate`` (PyTorch, same weights exported to HF, same prompt ids,
  same knobs, ``num_return_sequences = n``) per B rows, as static batching.

Static and continuous give identical rows (same per-row keys: tested in
tests/rollout/test_continuous.py), so they do the same useful work. transformers samples its
own answers (same distribution, other random numbers); its useful tokens are counted the same
way: each row's tokens up to and including its first EOS (or the cap).

Useful tokens/s = useful tokens / wall seconds, where the wall time excludes JAX tracing and
XLA compilation (their durations are read from ``jax.monitoring`` events during the run and
subtracted; the number is reported). Slot utilisation = useful row-steps / (B x decode steps).
Methods are run interleaved (static, continuous, transformers) for each repeat; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's OpenMP threads must not spin on a shared CPU

import jax
import jax.numpy as jnp
import numpy as np
from run_info import run_info

from qsharp_jax.checkpoints import loader
from qsharp_jax.core import host_memory
from qsharp_jax.rollout.sampler import Sampler, refill_threshold, row_keys, rows_to_start
from qsharp_jax.rollout.state import SamplerConfig
from qsharp_jax.tasks import data
from qsharp_jax.tasks.word_problems import WordProblems

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k", "test.jsonl")
_COMPILE_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
_compile_seconds = [0.0]


def _on_duration(event: str, duration: float, **_):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def run_ours(sampler, prompts, n, chunk_prompts, knobs, key):
    """(wall s, CPU s, compile s, lengths, decode steps); chunk_prompts=None: one call for all."""
    compile0, t, cpu = _compile_seconds[0], time.perf_counter(), time.process_time()
    lengths, steps = [], 0
    chunks = (
        [prompts]
        if chunk_prompts is None
        else [prompts[i : i + chunk_prompts] for i in range(0, len(prompts), chunk_prompts)]
    )
    for c, chunk in enumerate(chunks):
        start = 0 if chunk_prompts is None else c * chunk_prompts
        # the same per-row keys as one call over all prompts: fold_in(fold_in(key, p), j)
        keys = row_keys(key, len(prompts), n)[start * n : (start + len(chunk)) * n]
        out = sampler.generate(chunk, key=key, n=n, keys=keys, **knobs)
        lengths.append(out.lengths)
        steps += sampler.last_stats["steps"]
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return wall, cpu, _compile_seconds[0] - compile0, np.concatenate(lengths), steps


def run_hf(model, prompts, n, batch, stop_ids, pad_id, max_new, seed):
    """(wall s, lengths, decode steps) of transformers generate, B rows per call."""
    import torch

    torch.manual_seed(seed)
    per = batch // n
    lengths, steps, t, cpu = [], 0, time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), per):
        chunk = prompts[i : i + per]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.8,
                top_p=0.9,
                top_k=0,
                max_new_tokens=max_new,
                num_return_sequences=n,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
            )
        gen = out[:, width:].numpy()
        steps += gen.shape[1]
        for row in gen:
            hit = np.flatnonzero(np.isin(row, stop_ids))
            lengths.append(int(hit[0]) + 1 if len(hit) else len(row))
    return time.perf_counter() - t, time.process_time() - cpu, np.asarray(lengths), steps


def summarize(name, batch, wall, cpu, compile_s, lengths, steps):
    useful = int(lengths.sum())
    run = wall - compile_s
    return dict(
        method=name,
        batch=batch,
        wall_s=wall,
        cpu_s=cpu,
        compile_s=compile_s,
        run_s=run,
        useful_tokens=useful,
        decode_steps=steps,
        useful_tok_per_s=useful / run,
        # per CPU-second of this process (less sensitive to other jobs on the machine); the
        # compile time subtracted is wall time, so this slightly favours the method that compiles more
        useful_tok_per_cpu_s=useful / max(cpu - compile_s, 1e-9),
        utilisation=useful / (batch * steps),
        lengths=lengths.tolist(),
    )


def replay(lengths, batch: int, n: int, segment: int, max_new: int, fraction: float = 0.25) -> dict:
    """Decode steps and slot utilisation of static vs continuous batching for given row
    lengths (rows in order, n per prompt), by replaying the sampler's schedules without a
    model: static = one call per ``batch`` rows, each until its longest row stops;
    continuous = ``Sampler._continuous``'s refill rule (``refill_threshold`` and
    ``rows_to_start``; a segment ends after ``segment`` steps or once enough slots are free).
    A projection of the utilisation only (it ignores prefill and per-step cost differences)."""
    lengths = np.minimum(np.asarray(lengths), max_new)
    total = len(lengths)
    static = sum(int(lengths[i : i + batch].max()) for i in range(0, total, batch))
    left = np.zeros(batch, int)  # steps left per slot (0 = free)
    pending, steps, refills = 0, 0, 0
    while pending < total or left.any():
        free = np.flatnonzero(left == 0)
        if pending < total and len(free) >= refill_threshold(batch, n, pending, total, fraction):
            take = rows_to_start(len(free), n, pending, total)
            left[free[:take]] = lengths[pending : pending + take]
            pending += take
            refills += 1
        refill_at = refill_threshold(batch, n, pending, total, fraction)
        for _ in range(segment):
            if not left.any() or (batch - np.count_nonzero(left)) >= refill_at:
                break
            left = np.maximum(left - 1, 0)
            steps += 1
    useful = int(lengths.sum())
    return dict(
        batch=batch,
        rows=total,
        static_steps=static,
        continuous_steps=steps,
        refills=refills,
        static_utilisation=useful / (batch * static),
        continuous_utilisation=useful / (batch * steps),
        step_ratio=static / steps,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument(
        "--rows-per-slot", type=int, nargs="+", default=[4], help="workload = this x batch rows (one per batch, or one)"
    )
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--segment", type=int, default=16)
    ap.add_argument("--refill-fraction", type=float, default=0.25, help="SamplerConfig.refill_fraction")
    ap.add_argument("--prompt-bucket", type=int, default=64)
    ap.add_argument(
        "--attention-block", type=int, default=SamplerConfig.attention_block,
        help="SamplerConfig.attention_block (0: attend over the whole cache every step)",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--methods", nargs="+", choices=("static", "continuous", "transformers"), default=["static", "continuous"],
        help="which samplers to run (--hf adds transformers)",
    )  # fmt: skip
    ap.add_argument("--hf", action="store_true", help="also run transformers generate")
    ap.add_argument("--hf-batches", type=int, nargs="*", default=None, help="with --hf: only these batches")
    ap.add_argument("--hf-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--replay",
        default=None,
        help="no model: replay the continuous rows' lengths of this JSON (bootstrap-resampled to "
        "rows-per-slot x batch rows) through both schedules and print the utilisation",
    )
    args = ap.parse_args(argv)
    if args.replay:
        with open(args.replay) as f:
            recorded = np.concatenate([r["lengths"] for r in json.load(f)["runs"] if r["method"] == "continuous"])
        rng = np.random.default_rng(0)
        for batch, per in zip(args.batches, args.rows_per_slot * len(args.batches)):
            rows = rng.choice(recorded, per * batch)
            print(json.dumps(replay(rows, batch, args.n, args.segment, args.max_new, args.refill_fraction)), flush=True)
        return 0

    info = run_info(
        args,
        host_memory_reuse=host_memory.available(),  # glibc keeps freed blocks during decoding
    )
    print(json.dumps(info, indent=1), flush=True)
    loaded = loader.load("smollm2", dtype=jnp.float32)
    ref, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    stop = set(cfg.eos_token_ids)
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    stop_ids, pad_id = tuple(sorted(stop)), int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    problems = data.load_problems(DATA)
    task = WordProblems("gsm8k", DATA, DATA)  # the chat prompts of the main job (spec 4.2)
    knobs = dict(temperature=0.8, top_p=0.9)

    if args.hf and "transformers" not in args.methods:
        args.methods.append("transformers")
    hf_model = None
    if "transformers" in args.methods:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        hf_dir = args.hf_dir or "/tmp/rollout_bench_smollm2_hf"
        if not os.path.isdir(hf_dir):
            from qsharp_jax.checkpoints.export import export_hf

            export_hf(hf_dir, ref, cfg, tokenizer=tok)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    results = {"info": info, "stop_ids": stop_ids, "runs": []}
    per_slot = dict(
        zip(
            args.batches, args.rows_per_slot * len(args.batches) if len(args.rows_per_slot) == 1 else args.rows_per_slot
        )
    )
    for batch in args.batches:
        n_prompts = per_slot[batch] * batch // args.n
        prompts = task.encode_prompts(tok, problems[:n_prompts])
        base = dict(
            max_new_tokens=args.max_new,
            stop_ids=stop_ids,
            pad_id=pad_id,
            prompt_bucket=args.prompt_bucket,
            attention_block=args.attention_block,
        )
        static = Sampler(ref, config=SamplerConfig(**base, slots=0, batch_bucket=batch // args.n))
        cont = Sampler(
            ref,
            config=SamplerConfig(**base, slots=batch, segment=args.segment, refill_fraction=args.refill_fraction),
        )
        print(
            f"batch {batch}: {len(prompts)} prompts x {args.n} samples, prompt tokens "
            f"{min(map(len, prompts))}-{max(map(len, prompts))}",
            flush=True,
        )
        for rep in range(args.repeats):
            key = jax.random.key(1000 + rep)
            rows, lengths_s = [], None
            if "static" in args.methods:
                w, cpu, c, lengths_s, steps = run_ours(static, prompts, args.n, batch // args.n, knobs, key)
                rows.append(summarize("static", batch, w, cpu, c, lengths_s, steps))
                print(f"  static done: {w:.0f} s wall, {cpu:.0f} s CPU, {c:.0f} s compile", flush=True)
            if "continuous" in args.methods:
                w, cpu, c, lengths_c, steps = run_ours(cont, prompts, args.n, None, knobs, key)
                rows.append(summarize("continuous", batch, w, cpu, c, lengths_c, steps))
                print(f"  continuous done: {w:.0f} s wall, {cpu:.0f} s CPU, {c:.0f} s compile", flush=True)
                rows[-1]["refills"] = cont.last_stats["refills"]
                rows[-1]["prefills"] = cont.last_stats["prefills"]
                if lengths_s is not None:
                    rows[-1]["rows_with_other_length_than_static"] = int(np.sum(lengths_s != lengths_c))
                    rows[-1]["same_lengths_as_static"] = bool(np.array_equal(lengths_s, lengths_c))
            if hf_model is not None and (args.hf_batches is None or batch in args.hf_batches):
                # the same host allocator setting as our sampler uses (core.host_memory), so the
                # comparison is between the engines, not between malloc settings
                with host_memory.reuse_freed_memory():
                    w, cpu, lengths_h, steps = run_hf(
                        hf_model, prompts, args.n, batch, stop_ids, pad_id, args.max_new, rep
                    )
                rows.append(summarize("transformers", batch, w, cpu, 0.0, lengths_h, steps))
            for r in rows:
                r["repeat"] = rep
                r["load_average"] = os.getloadavg()
                print(
                    f"  [{rep}] {r['method']:12s} B={batch:3d} useful {r['useful_tokens']:6d} tok in "
                    f"{r['run_s']:7.1f}s (+{r['compile_s']:.1f}s compile): {r['useful_tok_per_s']:6.1f} tok/s, "
                    f"{r['useful_tok_per_cpu_s']:6.1f} tok/CPU-s, "
                    f"utilisation {r['utilisation']:.2f}, steps {r['decode_steps']}, load {r['load_average'][0]:.1f}",
                    flush=True,
                )
            results["runs"].extend(rows)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        for method in ("static", "continuous", "transformers"):
            got = [r for r in results["runs"] if r["batch"] == batch and r["method"] == method]
            if got:
                med = statistics.median(r["useful_tok_per_s"] for r in got)
                med_cpu = statistics.median(r["useful_tok_per_cpu_s"] for r in got)
                util = statistics.median(r["utilisation"] for r in got)
                lens = np.concatenate([r["lengths"] for r in got])
                print(
                    f"  median {method:12s} B={batch}: {med:6.1f} tok/s, {med_cpu:6.1f} tok/CPU-s, "
                    f"utilisation {util:.2f}; lengths mean "
                    f"{lens.mean():.0f}, p50 {np.median(lens):.0f}, p90 {np.percentile(lens, 90):.0f}, "
                    f"at cap {np.mean(lens >= args.max_new):.2f}",
                    flush=True,
                )
    results["info"]["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
