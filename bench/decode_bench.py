"""Decode benchmark of the rollout engine on SmolLM2-135M-Instruct (fp32), side by side with
this machine's dense-matmul rate and (optionally) the transformers peer baselines.

Full run (long; run it on a quiet machine):

    PYTHONPATH=. python bench/decode_bench.py --json bench/results.json [--hf]

Smoke run: ``--quick`` (16 new tokens, 1 timed run, batches 1 and 16).

What is measured, each as the median of ``--runs`` timed calls after one warm-up call
(the warm-up compiles; its extra time is reported as compile time):

1. unguided sampling (T 0.8, top-p 0.9, exact), batches 1/16/64, ``--max-new`` tokens per
   row, no early stops (like ``min_new_tokens``); tok/s counts all generated tokens and the
   time includes prefill, as transformers ``generate`` does;
2. guided, same-size V-type guide (the reference's backbone + a V head), k = 20, batch 16:
   tok/s, and the achieved FLOP/s of the decode step against this machine's dense-matmul
   FLOP/s for exactly the step's GEMM shapes (measured here, same weights);
3. guided with a same-size Q-type head (one guide token per step, k head columns): ratio;
4. guided with a small guide (the first ``--small-guide-layers`` layers, V-type): ratio;
5. compile time of the guided loop, and whether a second eta / temperature recompiles;
6. a roofline prediction for a TPU v5e at batch 16 (model in :func:`roofline_step_seconds`);
7. with ``--hf``: ``../shared/baselines/hf_generate_bench.py`` and ``hf_guided_bench.py`` in
   subprocesses on an HF export of the same weights (``--hf-dir``, or exported here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax.checkpoints import loader
from qsharp_jax.guidance import model as guidance_model
from qsharp_jax.models import decoder
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.rollout.engine import decode_jit
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

BASELINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "baselines")
# The peer baselines' sixteen GSM8K-style questions (so both sides see the same prompts).
SUFFIX = " Think step by step and give the final answer after ####."


def baseline_questions() -> list[str]:
    path = os.path.join(BASELINES, "hf_generate_bench.py")
    with open(path) as f:
        src = f.read()
    namespace: dict = {}
    exec(src[src.index("QUESTIONS = [") : src.index("def build_prompts")], namespace)  # data only, no torch
    return namespace["QUESTIONS"]


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    questions = baseline_questions()
    out = []
    for i in range(batch):
        msgs = [{"role": "user", "content": questions[i % len(questions)] + SUFFIX}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


# ---- FLOP and byte model ---------------------------------------------------------------------


def attention_flops(cfg: ModelConfig, context: int) -> float:
    """Score + value FLOPs of one query token over ``context`` keys, all layers."""
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def step_flops(
    ref: ModelConfig, batch: int, context: int, guide: ModelConfig | None = None, kind: str = "v", k: int = 20
) -> float:
    """FLOPs of one decode step: the reference (with LM head) on ``batch`` tokens, plus the
    guide on batch * (1 + k) tokens (V-type) or batch tokens + k head columns (Q-type)."""
    total = batch * (ref.matmul_flops_per_token(lm_head=True) + attention_flops(ref, context))
    if guide is not None:
        tokens = batch * (1 + k) if kind == "v" else batch
        total += tokens * (guide.matmul_flops_per_token(lm_head=False) + attention_flops(guide, context))
        total += batch * k * 2 * guide.hidden_size  # the head at k candidates (V: [E, 1] each; Q: k columns)
    return total


def roofline_step_seconds(
    cfg: ModelConfig,
    batch: int,
    tokens_per_row: int,
    context: int,
    *,
    peak_flops: float,
    bandwidth: float,
    bytes_per_param: int = 2,
    lm_head: bool = True,
) -> float:
    """One model's decode step on an accelerator: max(compute time, memory time), where
    compute = 2 * params_touched * tokens + attention, and memory = all weights once
    (bf16) + the KV cache of every row read once (K and V, bf16) + that of the probe tokens."""
    tokens = batch * tokens_per_row
    flops = tokens * (cfg.matmul_flops_per_token(lm_head=lm_head) + attention_flops(cfg, context))
    weights = cfg.num_params() - (0 if lm_head or cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    kv = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * bytes_per_param
    return max(flops / peak_flops, (weights * bytes_per_param + kv) / bandwidth)


TPU_V5E = dict(peak_flops=197e12, bandwidth=819e9)  # bf16 dense FLOP/s, HBM bytes/s per chip

LLAMA_8B = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128)
LLAMA_1B = ModelConfig("llama", 128256, 2048, 8192, 16, 32, 8, 64, tie_word_embeddings=True)


def tpu_prediction(ref: ModelConfig, guide: ModelConfig, batch: int = 16, k: int = 20, context: int = 1024) -> dict:
    base = roofline_step_seconds(ref, batch, 1, context, **TPU_V5E)
    g = roofline_step_seconds(guide, batch, 1 + k, context, lm_head=False, **TPU_V5E)
    return {"ref_step_ms": 1e3 * base, "guide_step_ms": 1e3 * g, "guided_over_unguided": (base + g) / base}


# ---- measurements ------------------------------------------------------------------------------


def timed(fn, runs: int) -> tuple[float, list[float]]:
    """(warm-up seconds, timed seconds): one warm-up call, then ``runs`` calls."""
    t = time.perf_counter()
    fn()
    warm = time.perf_counter() - t
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return warm, times


def sampling_run(
    sampler, prompts, args, *, guided: bool, seed: int = 0, inv_eta: float = 10.0, temperature: float = 0.8
):
    out = sampler.generate(
        prompts, key=jax.random.key(seed), temperature=temperature, top_p=0.9, inv_eta=inv_eta, guided=guided
    )
    assert out.steps == args.max_new and np.all(out.lengths == args.max_new), "no early stops expected"
    return out


def measure(name: str, sampler, prompts, args, *, guided: bool, flops_per_step: float | None = None) -> dict:
    """Medians over runs of the total time (prefill + decode, as tok/s) and of the decode
    loop alone (per step; the sampler times prefill and decode apart)."""
    batch = len(prompts)
    timings = []

    def run():
        sampling_run(sampler, prompts, args, guided=guided)
        timings.append(dict(sampler.last_timings))

    warm, times = timed(run, args.runs)
    timed_runs = timings[1:]
    med = statistics.median(times)
    prefill = statistics.median(t["prefill"] for t in timed_runs)
    step = statistics.median(t["decode"] for t in timed_runs) / args.max_new
    res = {
        "name": name,
        "batch": batch,
        "times_s": times,
        "time_median_s": med,
        "timings": timed_runs,
        "tok_per_s_median": batch * args.max_new / med,
        "warmup_s": warm,
        "compile_s_approx": warm - med,
        "prefill_s": prefill,
        "decode_step_ms": 1e3 * step,
    }
    if flops_per_step:
        res["step_gflop"] = flops_per_step / 1e9
        res["achieved_gflop_s"] = flops_per_step / step / 1e9
    print(
        f"  {name:38s} batch {batch:3d}: {res['tok_per_s_median']:7.1f} tok/s  step {res['decode_step_ms']:6.1f} ms"
        f"  prefill {prefill:5.2f}s  warm-up {warm:5.1f}s"
        + (f"  {res['achieved_gflop_s']:.1f} GFLOP/s" if flops_per_step else ""),
        flush=True,
    )
    return res


def matmul_rate(ref_model, guide_backbone, batch: int, k: int, runs: int) -> dict:
    """This machine's dense-matmul FLOP/s for the GEMMs of one guided V-type step, same weights:
    the reference's projections and LM head at M = batch, the guide's at M = batch * (1 + k)."""

    def gemms(model):
        for block in model.layers:
            a, m = block.attn, block.mlp
            e = a.wq.get_value().shape[0]
            yield a.wq.get_value().reshape(e, -1)
            yield a.wk.get_value().reshape(e, -1)
            yield a.wv.get_value().reshape(e, -1)
            yield a.wo.get_value().reshape(-1, e)
            yield m.gate.get_value()
            yield m.up.get_value()
            yield m.down.get_value()

    ref_w = list(gemms(ref_model)) + [ref_model.lm_head_kernel()]
    guide_w = list(gemms(guide_backbone))

    @jax.jit
    def run(ref_w, guide_w):
        acc = jnp.zeros((), jnp.float32)
        for w, rows in [(w, batch) for w in ref_w] + [(w, batch * (1 + k)) for w in guide_w]:
            x = jnp.full((rows, w.shape[0]), 1e-3, w.dtype) + acc  # data dependence keeps the order
            acc = acc + jnp.sum(x @ w) * 1e-9
        return acc

    flops = sum(2 * batch * w.shape[0] * w.shape[1] for w in ref_w)
    flops += sum(2 * batch * (1 + k) * w.shape[0] * w.shape[1] for w in guide_w)
    _, times = timed(lambda: jax.block_until_ready(run(ref_w, guide_w)), max(3, runs))
    med = statistics.median(times)
    print(
        f"  dense matmuls of one guided step (same shapes/weights): {flops / med / 1e9:.1f} GFLOP/s "
        f"({1e3 * med:.1f} ms for {flops / 1e9:.1f} GFLOP)",
        flush=True,
    )
    return {"gflop": flops / 1e9, "time_ms": 1e3 * med, "gflop_s": flops / med / 1e9}


def make_guide(ref_model, kind: str, layers: int | None) -> guidance_model.GuidanceModel:
    """A guide on a copy of the reference backbone (untrained head: only the cost matters)."""
    backbone = nnx.clone(ref_model)
    if layers:
        decoder.truncate_layers(backbone, layers)
    return guidance_model.build(backbone, guidance_model.HeadConfig(kind=kind, init="normal"), seed=1234)


# ---- peer baselines ------------------------------------------------------------------------------


def run_hf_baselines(args, model, cfg, tokenizer, out_dir: str) -> dict:
    hf_dir = args.hf_dir
    if hf_dir is None:
        from qsharp_jax.export import export_hf

        hf_dir = os.path.join(out_dir, "smollm2-hf")
        if not os.path.isdir(hf_dir):
            export_hf(hf_dir, model, cfg, tokenizer=tokenizer)
    env = dict(os.environ, SMOLLM2_HF_DIR=hf_dir)
    results = {}
    jobs = {
        "hf_generate": ["hf_generate_bench.py", "--batches", *map(str, args.batches)],
        "hf_guided": [
            "hf_guided_bench.py",
            "--batches",
            str(args.guided_batch),
            "--k",
            str(args.k),
            "--mode",
            args.hf_guided_mode,
            "--no-verify",
        ],
    }
    for name, cmd in jobs.items():
        out = os.path.join(out_dir, f"{name}.json")
        full = [
            sys.executable,
            *cmd[:1],
            *cmd[1:],
            "--max-new",
            str(args.max_new),
            "--runs",
            str(args.runs),
            "--json",
            out,
        ]
        print(f"  running {' '.join(full)}", flush=True)
        proc = subprocess.run(full, cwd=BASELINES, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            results[name] = {"error": proc.stderr[-500:]}
            continue
        with open(out) as f:
            results[name] = json.load(f)
    return results


def hf_tok_s(hf: dict, name: str, batch: int) -> float | None:
    for r in hf.get(name, {}).get("runs", []):
        if r.get("batch") == batch:
            return r.get("tok_per_s_median")
    return None


# ---- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="smollm2", help="reference model (default: packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--guided-batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--small-guide-layers", type=int, default=4)
    ap.add_argument("--prompt-bucket", type=int, default=16)
    ap.add_argument("--skip", nargs="*", default=[], choices=["unguided", "v", "q", "small"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, 1 run, batches 1 16")
    ap.add_argument("--hf", action="store_true", help="also run the transformers peer baselines")
    ap.add_argument("--hf-dir", default=None, help="HF folder of the same model (default: export one)")
    ap.add_argument(
        "--hf-guided-mode",
        choices=("two_pass", "fused"),
        default="two_pass",
        help="the authors'-way baseline's candidate pass (its own default: two_pass)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.max_new, args.runs, args.batches = 16, 1, [1, 16]

    dtype = jnp.float32
    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "jax": jax.__version__,
        "devices": str(jax.devices()),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "max_new": args.max_new,
        "runs": args.runs,
    }
    print(json.dumps(info, indent=1), flush=True)
    loaded = loader.load(args.ref, dtype=dtype)
    ref, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    conf = SamplerConfig(
        slots=0,  # the static engine: this bench times its decode step (rollout_bench.py compares both)
        max_new_tokens=args.max_new,
        k=args.k,
        stop_ids=(),
        prompt_bucket=args.prompt_bucket,
        pad_id=int(tok.pad_token_id or 0),
    )
    results: dict = {"info": info, "unguided": [], "guided": {}}
    gb = args.guided_batch
    guided_prompts = chat_prompts(tok, gb)
    context = int(np.mean([len(p) for p in guided_prompts])) + args.max_new // 2  # mean keys per step

    print("unguided sampling (T 0.8, top-p 0.9, exact):", flush=True)
    base = Sampler(ref, config=conf)
    if "unguided" not in args.skip:
        for b in args.batches:
            results["unguided"].append(measure("unguided", base, chat_prompts(tok, b), args, guided=False))
    unguided_gb = next((r for r in results["unguided"] if r["batch"] == gb), None)
    if unguided_gb is None:
        unguided_gb = measure("unguided", base, guided_prompts, args, guided=False)
        results["unguided"].append(unguided_gb)

    def guided(label, guide, kind):
        sampler = Sampler(ref, guide, conf)
        flops = step_flops(cfg, gb, context, guide.cfg, kind, args.k)
        res = measure(label, sampler, guided_prompts, args, guided=True, flops_per_step=flops)
        res["guided_over_unguided_time"] = res["time_median_s"] / unguided_gb["time_median_s"]
        res["guided_over_unguided_step"] = res["decode_step_ms"] / unguided_gb["decode_step_ms"]
        print(
            f"    guided/unguided: {res['guided_over_unguided_time']:.2f} (total), "
            f"{res['guided_over_unguided_step']:.2f} (decode step)",
            flush=True,
        )
        return sampler, res

    if "v" not in args.skip:
        print("guided, same-size V-type guide:", flush=True)
        guide = make_guide(ref, "v", None)
        sampler, res = guided("guided V same-size", guide, "v")
        rate = matmul_rate(ref, guide.backbone, gb, args.k, args.runs)
        res["matmul_gflop_s_same_shapes"] = rate["gflop_s"]
        res["achieved_over_matmul"] = res["achieved_gflop_s"] / rate["gflop_s"]
        print(f"    achieved / dense-matmul FLOP/s: {res['achieved_over_matmul']:.2f}", flush=True)
        # a second eta and temperature must not recompile the guided loop
        before = decode_jit._cache_size()
        t = time.perf_counter()
        sampling_run(sampler, guided_prompts, args, guided=True, inv_eta=3.0, temperature=0.6)
        res["second_eta_temperature_s"] = time.perf_counter() - t
        res["recompiled_on_new_eta_temperature"] = decode_jit._cache_size() != before
        print(
            f"    compile of the guided loop ~{res['compile_s_approx']:.1f}s; new eta/temperature "
            f"recompiled: {res['recompiled_on_new_eta_temperature']}",
            flush=True,
        )
        results["guided"]["v_same_size"] = res
        del guide, sampler

    if "q" not in args.skip:
        print("guided, same-size Q-type head:", flush=True)
        guide = make_guide(ref, "q", None)
        results["guided"]["q_same_size"] = guided("guided Q same-size", guide, "q")[1]
        del guide

    if "small" not in args.skip:
        n = args.small_guide_layers
        print(f"guided, small V-type guide ({n} layers):", flush=True)
        guide = make_guide(ref, "v", n)
        res = guided(f"guided V {n}-layer", guide, "v")[1]
        res["guide_over_ref_flops_per_token"] = guide.cfg.matmul_flops_per_token(
            lm_head=False
        ) / cfg.matmul_flops_per_token(lm_head=True)
        res["tpu_v5e_prediction"] = tpu_prediction(cfg, guide.cfg, gb, args.k)
        results["guided"]["v_small"] = res
        del guide

    results["tpu_v5e_prediction_llama8b_1b"] = tpu_prediction(LLAMA_8B, LLAMA_1B, gb, args.k)
    print(
        "TPU v5e roofline, batch 16, k 20, 1024 context: "
        + json.dumps(
            {
                "smollm2+small": results["guided"].get("v_small", {}).get("tpu_v5e_prediction"),
                "llama8b+1b": results["tpu_v5e_prediction_llama8b_1b"],
            }
        ),
        flush=True,
    )

    if args.hf:
        print("transformers peer baselines:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results["hf"] = run_hf_baselines(args, ref, cfg, tok, tmp)
        for r in results["unguided"]:
            hf = hf_tok_s(results["hf"], "hf_generate", r["batch"])
            if hf:
                r["hf_tok_per_s"], r["ours_over_hf"] = hf, r["tok_per_s_median"] / hf
        v = results["guided"].get("v_same_size")
        hfg = hf_tok_s(results["hf"], "hf_guided", gb)
        if v and hfg:
            v["hf_guided_tok_per_s"], v["ours_over_hf_guided"] = hfg, v["tok_per_s_median"] / hfg

    print("\n| measurement | batch | tok/s | decode step ms | ratio |\n|---|---|---|---|---|")
    for r in results["unguided"]:
        ratio = f"{r['ours_over_hf']:.2f}x transformers" if "ours_over_hf" in r else ""
        print(f"| unguided | {r['batch']} | {r['tok_per_s_median']:.1f} | {r['decode_step_ms']:.1f} | {ratio} |")
    for key, r in results["guided"].items():
        extra = f"guided/unguided {r['guided_over_unguided_time']:.2f}"
        if "achieved_over_matmul" in r:
            extra += f"; {r['achieved_over_matmul']:.2f} of matmul FLOP/s"
        if "ours_over_hf_guided" in r:
            extra += f"; {r['ours_over_hf_guided']:.2f}x authors' way"
        print(f"| {key} | {r['batch']} | {r['tok_per_s_median']:.1f} | {r['decode_step_ms']:.1f} | {extra} |")
    for name in ("hf_generate", "hf_guided"):
        for r in results.get("hf", {}).get(name, {}).get("runs", []):
            print(f"| {name} (transformers) | {r['batch']} | {r['tok_per_s_median']:.1f} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
