import types
import typing

import jax
import numpy as np
import pytest

from qsharp_jax.qsharp import collect
from qsharp_jax.tasks.grading import Grader

EOS = 0


def _rollout(question, reward, prompt=(1, 2), response=(10, 11, 12, EOS), cut=1, cont=(20, EOS), sample=0):
    return collect.Rollout(
        question=question,
        gold="1",
        prompt_ids=list(prompt),
        response_ids=list(response),
        response_correct=False,
        cut=cut,
        continuation_ids=list(cont),
        reward=reward,
        iteration=1,
        sample=sample,
    )


def test_classifier_example_from_a_hand_made_rollout():
    rollouts = [_rollout("a", 1.0), _rollout("a", 0.0, cut=3, cont=())]
    all_tokens = collect.create_classifier_data(rollouts)
    assert all_tokens[0] == collect.ClassifierExample(
        input_ids=[1, 2, 10], target_ids=[11, 20, EOS], reward=1.0, weight=1.0
    )
    # Cut at EOS: the EOS token is the only target, nothing was continued.
    assert all_tokens[1] == collect.ClassifierExample([1, 2, 10, 11, 12], [EOS], 0.0, 1.0)
    single = collect.create_classifier_data(rollouts, use_all_ref_tokens=False)
    assert single[0].target_ids == [11] and single[0].input_ids == [1, 2, 10]


def test_cut_at_first_token_has_the_bare_prompt_as_input():
    (ex,) = collect.create_classifier_data([_rollout("a", 1.0, cut=0)], drop_no_variation=False)
    assert ex.input_ids == [1, 2] and ex.target_ids == [10, 20, EOS]


def test_drop_no_variation_is_per_problem_over_all_samples():
    rollouts = [
        _rollout("all right", 1.0),
        _rollout("all right", 1.0),
        _rollout("all wrong", 0.0),
        _rollout("mixed", 1.0),
        _rollout("mixed", 0.0),
    ]
    kept = collect.create_classifier_data(rollouts)
    assert len(kept) == 2 and sorted(e.reward for e in kept) == [0.0, 1.0]
    assert len(collect.create_classifier_data(rollouts, drop_no_variation=False)) == 5
    # Aggregation can add variation to a problem that had none in one iteration.
    later = [_rollout("all right", 0.0)]
    assert len(collect.create_classifier_data(collect.aggregate([rollouts, later]))) == 5


def test_max_length_skips_and_truncates():
    r = _rollout("a", 1.0)  # input length 3, target length 3
    assert collect.create_classifier_data([r], drop_no_variation=False, max_length=5)[0].target_ids == [11, 20]
    assert collect.create_classifier_data([r], drop_no_variation=False, max_length=4) == []


class Tok:
    """Token id i <-> one character; 0 is EOS (dropped when decoding)."""

    vocab: typing.ClassVar[dict] = {1: "Q", 2: ":", 3: "\\boxed{", 4: "7", 5: "8", 6: "}", 7: " "}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab.get(i, "?") for i in ids if i != EOS)


class ScriptedSampler:
    """Guided/unguided responses: the roll-in writes "\\boxed{7 ..." and stops before closing the
    box; pi_ref continuations close it with "8}" when unguided. Records every call."""

    def __init__(self, response=(3, 4, 7, 7, EOS)):
        self.response = list(response)
        self.calls = []

    def generate(self, prompts, *, key, n, temperature, top_p, inv_eta, guided):
        self.calls.append(dict(prompts=[list(p) for p in prompts], n=n, guided=guided, inv_eta=inv_eta))
        rows, index = [], []
        for i, prompt in enumerate(prompts):
            for _ in range(n):
                if len(prompt) == 2:  # a fresh problem prompt
                    rows.append(self.response)
                else:  # a continuation: pi_ref closes an open box with 8 (or just stops)
                    text = Tok().decode(prompt)
                    rows.append([5, 6, EOS] if text.count("{") > text.count("}") else [EOS])
                index.append(i)
        width = max(len(r) for r in rows)
        tokens = np.zeros((len(rows), width), np.int32)
        for j, r in enumerate(rows):
            tokens[j, : len(r)] = r
        return types.SimpleNamespace(
            tokens=tokens, lengths=np.array([len(r) for r in rows]), prompt_index=np.array(index)
        )


def test_collect_iteration_cuts_continues_and_labels():
    sampler = ScriptedSampler()
    prompts = [[1, 2], [1, 2], [1, 2]]
    rollouts = collect.collect_iteration(
        sampler,
        Tok(),
        prompts,
        ["q0", "q1", "q2"],
        ["78", "7", "78"],
        iteration=1,
        num_samples=4,
        key=jax.random.key(0),
        guided=False,
        inv_eta=0.0,
        grader=Grader(matcher="strict"),
        problems_per_batch=2,
    )
    assert len(rollouts) == 12
    assert [(r.question, r.sample) for r in rollouts[:5]] == [("q0", 0), ("q0", 1), ("q0", 2), ("q0", 3), ("q1", 0)]
    # Roll-ins: one call per 2 problems, n=4, guidance as asked; continuations: pi_ref only, n=1.
    rollin = [c for c in sampler.calls if c["n"] == 4]
    assert [len(c["prompts"]) for c in rollin] == [2, 1] and not any(c["guided"] for c in rollin)
    for c in sampler.calls:
        if c["n"] == 1:
            assert c["guided"] is False
    cuts = {r.cut for r in rollouts}
    assert cuts <= set(range(5)) and len(cuts) > 1
    for r in rollouts:
        assert r.response_ids == [3, 4, 7, 7, EOS] and r.response_correct is False
        if r.cut == 4:  # at EOS: no continuation, the response's own label
            assert r.continuation_ids == [] and r.reward == 0.0
        else:
            # The open box is closed by pi_ref with "8}": "\\boxed{7 ...8}" or "\\boxed{78}" when cut right after 7.
            assert r.continuation_ids == [5, 6, EOS]
            expected = {"q0": "78", "q1": "7", "q2": "78"}[r.question] == Tok().decode(r.prefix_ids + [5, 6])[7:-1]
            assert r.reward == float(expected)
        assert r.prompt_ids == [1, 2]
    # Continuation prompts are prompt + prefix (cut token included).
    cont_prompts = [p for c in sampler.calls if c["n"] == 1 for p in c["prompts"]]
    assert sorted(cont_prompts) == sorted([1, 2] + r.prefix_ids for r in rollouts if r.cut < 4)


def test_collect_is_reproducible_and_shards_draw_their_own_cuts():
    args = dict(
        iteration=2, num_samples=3, key=jax.random.key(1), guided=True, inv_eta=10.0, grader=Grader(matcher="strict")
    )
    a = collect.collect_iteration(ScriptedSampler(), Tok(), [[1, 2]] * 4, list("abcd"), ["7"] * 4, **args)
    b = collect.collect_iteration(ScriptedSampler(), Tok(), [[1, 2]] * 4, list("abcd"), ["7"] * 4, **args)
    assert a == b
    c = collect.collect_iteration(ScriptedSampler(), Tok(), [[1, 2]] * 4, list("abcd"), ["7"] * 4, shard=1, **args)
    assert [r.cut for r in c] != [r.cut for r in a]


def test_save_and_load_round_trip(tmp_path):
    rollouts = [_rollout("a", 1.0), _rollout("b", 0.0, cut=3, cont=())]
    path = collect.rollouts_path(str(tmp_path), 1)
    collect.save_rollouts(path, rollouts)
    assert collect.load_rollouts(path) == rollouts
    with open(path, "a") as f:
        f.write('{"question": "c"}\n')
    with pytest.raises(ValueError, match=r"iteration_1/shard_00000\.jsonl:3: rollout record misses keys"):
        collect.load_rollouts(path)


def test_a_continuous_sampler_collects_the_shard_in_one_call_with_the_chunked_rows():
    """The same rollouts as chunk by chunk with the static engine (same per-row keys), from one
    roll-in call and one continuation call for the whole shard."""
    from qsharp_jax.models import decoder as M
    from qsharp_jax.models.config import ModelConfig
    from qsharp_jax.rollout.sampler import Sampler
    from qsharp_jax.rollout.state import SamplerConfig

    cfg = ModelConfig(
        model_type="llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    ref = M.build(cfg, seed=0)
    prompts = [[1, 2], [1, 2, 7], [2], [1, 7, 7, 2], [2, 2, 1]]
    args = dict(iteration=1, num_samples=3, key=jax.random.key(4), guided=False, inv_eta=0.0, problems_per_batch=2)
    texts = (list("abcde"), ["7"] * 5)

    def run(slots):
        conf = SamplerConfig(max_new_tokens=6, stop_ids=(EOS,), prompt_bucket=4, slots=slots, segment=2)
        sampler = Sampler(ref, config=conf)
        calls = []
        generate = sampler.generate
        sampler.generate = lambda prompts, **kw: calls.append(len(prompts)) or generate(prompts, **kw)
        return collect.collect_iteration(sampler, Tok(), prompts, *texts, **args), calls

    static, static_calls = run(0)
    cont, cont_calls = run(4)
    assert static_calls[:3] == [2, 2, 1] and len(cont_calls) == 2 and cont_calls[0] == 5
    assert len({len(r.response_ids) for r in cont}) > 1 and any(r.continuation_ids for r in cont)
    assert cont == static
