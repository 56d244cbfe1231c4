"""Learner padding before/after packing on Q#-shaped classifier examples (issue 11 item 3).

    PYTHONPATH=. python bench/padding_report.py --lengths /tmp/rollout_bench.json

Examples are built like ``qsharp.collect`` builds them: a GSM8K train prompt (SmolLM2 chat
template), a response of a length drawn from SmolLM2's own answers (the ``continuous`` rows'
lengths recorded by ``bench/rollout_bench.py``), a uniform random cut; input = prompt +
response[:cut], target = the cut token + the rest (the reference continuation from the cut
is another sample; its length is approximated by the remainder). Token ids do not
matter here, only lengths. Padded fraction = pad tokens / all tokens of one epoch's batches,
with the learner defaults (buckets, batch size) unless overridden.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from qsharp_jax.checkpoints import loader
from qsharp_jax.config import learner_defaults
from qsharp_jax.guidance import batching
from qsharp_jax.tasks import data

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k", "train.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", required=True, help="rollout_bench.py JSON (response lengths)")
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16, help="examples per problem")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--buckets", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    c = learner_defaults()
    batch_size = args.batch_size or c.batch_size
    buckets = tuple(args.buckets or c.buckets)
    with open(args.lengths) as f:
        runs = json.load(f)["runs"]
    responses = np.concatenate([r["lengths"] for r in runs if r["method"] == "continuous"])
    tok = loader.load_tokenizer(None)
    prompts = [len(p) for p in data.encode_prompts(tok, data.load_problems(DATA, limit=args.problems))]
    rng = np.random.default_rng(0)
    examples = []
    for p in prompts:
        for _ in range(args.samples):
            n = int(rng.choice(responses))
            cut = int(rng.integers(n))
            examples.append(batching.Example([1] * (p + cut), [2] * (n - cut), 1.0))
    bucketed = batching.bucket_examples(examples, buckets)
    packed = batching.pack_examples(bucketed, batch_size)
    report = dict(
        examples=len(examples),
        prompt_tokens=dict(min=min(prompts), max=max(prompts)),
        response_tokens=dict(mean=float(responses.mean()), max=int(responses.max())),
        buckets=buckets,
        batch_size=batch_size,
        padded_fraction_bucketed=batching.bucketed_padded_fraction(bucketed, batch_size),
        padded_fraction_packed=packed.padded_fraction(),
        packed_row_length=packed.row_length,
        packed_rows_per_batch=packed.rows_per_batch,
        batches_per_epoch=dict(bucketed=bucketed.num_batches(batch_size), packed=packed.num_batches()),
    )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
