"""Command-line sampling, optionally Q#/CD-guided:

    python -m qsharp_jax.generate --ref smollm2 --prompt "What is 7 * 8?" --n 2 \\
        [--guide PATH --guide-head v --eta 0.1] [--max-new-tokens 128 --temperature 0.8 --top-p 0.9]

``--ref`` / ``--guide``: anything :func:`qsharp_jax.checkpoints.loader.load` reads (a converted Orbax dir,
an HF folder, a .gguf, or ``smollm2`` for the packaged SmolLM2-135M-Instruct). The guide is
a decoder backbone plus a fresh head (``--guide-head v|q``, ``--guide-head-init zero|normal``);
``--guide-layers N`` keeps only its first N layers (a cheap small guide). Trained guidance
checkpoints from the learner are read with ``--guide-checkpoint DIR`` (head and backbone
as trained).

eta is the paper's KL weight (``--eta 0.1``); ``--inv-eta`` is the authors' ``eta`` (= 1/eta, 10).
Prints each completion, a progress bar over batches and the generated tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from qsharp_jax.checkpoints import loader
from qsharp_jax.guidance import model as guidance_model
from qsharp_jax.guidance.learner import load_trained_guide
from qsharp_jax.models import decoder
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig


def build_guide(path, *, kind: str, distribution: str, init: str, layers: int | None, dtype, seed: int = 0):
    backbone = loader.load(path, dtype=dtype, tokenizer=False).model
    if layers:
        decoder.truncate_layers(backbone, layers)
    head = guidance_model.HeadConfig(kind=kind, distribution=distribution, init=init)
    return guidance_model.build(backbone, head, seed=seed)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_ids_of(tokenizer, cfg) -> tuple:
    ids = set(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="smollm2", help="reference model path (or 'smollm2')")
    guide_src = ap.add_mutually_exclusive_group()
    guide_src.add_argument("--guide", default=None, help="guide backbone path (reference-style model) + a fresh head")
    guide_src.add_argument(
        "--guide-checkpoint",
        default=None,
        help="a trained guide: the learner's checkpoint dir (e.g. runs/.../guide/iteration_2)",
    )
    ap.add_argument("--guide-head", choices=guidance_model.KINDS, default="v")
    ap.add_argument("--guide-distribution", choices=guidance_model.DISTRIBUTIONS, default="bernoulli")
    ap.add_argument("--guide-head-init", choices=("zero", "normal"), default="normal")
    ap.add_argument("--guide-layers", type=int, default=None, help="keep only the guide's first N layers")
    ap.add_argument("--guidance", choices=("qsharp", "cd"), default="qsharp")
    eta = ap.add_mutually_exclusive_group()
    eta.add_argument("--eta", type=float, default=None, help="KL weight eta (paper); offset scale 1/eta")
    eta.add_argument("--inv-eta", type=float, default=None, help="1/eta (the authors' --eta); default 10")
    ap.add_argument("--k", type=int, default=20, help="guidance candidates per step")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as is")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--batch-prompts", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", action="store_true", help="compile with an untimed first call (clean tokens/s)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.eta is not None and args.eta <= 0:
        raise SystemExit("--eta must be > 0 (use --inv-eta 0 for no guidance strength).")
    inv_eta = 1.0 / args.eta if args.eta is not None else (10.0 if args.inv_eta is None else args.inv_eta)
    dtype = jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    ref = loader.load(args.ref, dtype=dtype)
    if ref.tokenizer is None:
        raise SystemExit(f"{args.ref} has no tokenizer: pass a model folder/GGUF that carries one.")
    guide = None
    if args.guide_checkpoint:
        guide = load_trained_guide(args.guide_checkpoint)
        args.guide_head, args.guide_distribution = guide.head_cfg.kind, guide.head_cfg.distribution
    elif args.guide:
        guide = build_guide(
            args.guide,
            kind=args.guide_head,
            distribution=args.guide_distribution,
            init=args.guide_head_init,
            layers=args.guide_layers,
            dtype=dtype,
            seed=args.seed,
        )
    tok = ref.tokenizer
    config = SamplerConfig(
        max_new_tokens=args.max_new_tokens,
        k=args.k,
        guidance=args.guidance,
        stop_ids=stop_ids_of(tok, ref.config),
        pad_id=int(tok.pad_token_id if tok.pad_token_id is not None else 0),
    )
    sampler = Sampler(ref.model, guide, config)
    print(
        f"loaded in {time.perf_counter() - t0:.1f}s; guide: "
        f"{'none' if guide is None else f'{args.guide_head}-type {args.guide_distribution}, '}"
        f"{'' if guide is None else f'{guide.cfg.num_layers} layers'}"
        f", 1/eta={inv_eta:g}",
        file=sys.stderr,
    )

    prompts = [encode_prompt(tok, p, chat=not args.no_chat_template) for p in args.prompt]
    key = jax.random.key(args.seed)
    chunks = range(0, len(prompts), args.batch_prompts)
    generated, elapsed, index = 0, 0.0, 0
    knobs = dict(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        greedy=args.greedy,
        inv_eta=inv_eta,
        guided=guide is not None,
    )
    if args.warmup:
        t = time.perf_counter()
        sampler.generate(prompts[: args.batch_prompts], key=key, **knobs)
        print(f"warm-up call (compilation + one run): {time.perf_counter() - t:.1f}s", file=sys.stderr)
    bar = tqdm(total=len(prompts) * args.n, unit="sample", file=sys.stderr)
    for c, start in enumerate(chunks):
        t = time.perf_counter()
        out = sampler.generate(prompts[start : start + args.batch_prompts], key=jax.random.fold_in(key, c), **knobs)
        elapsed += time.perf_counter() - t
        generated += int(out.lengths.sum())
        bar.update(len(out.lengths))
        bar.set_postfix(tok_s=f"{generated / elapsed:.1f}")
        for r, ids in enumerate(out.completions()):
            text = tok.decode(ids, skip_special_tokens=True)
            bar.write(
                f"--- prompt {start + int(out.prompt_index[r])} sample {index % args.n} "
                f"({len(ids)} tokens, KL {out.kl_traj[r]:.3f})\n{text}"
            )
            index += 1
    bar.close()
    note = "" if args.warmup else " (includes compilation; --warmup excludes it)"
    print(f"{generated} tokens in {elapsed:.2f}s = {generated / elapsed:.1f} tokens/s{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
