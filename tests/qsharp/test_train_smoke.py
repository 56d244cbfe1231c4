"""End to end: the Q# job on a tiny random Llama with a byte-level chat tokenizer, two iterations
(so the second roll-in is guided), a handful of problems, then a resume that reuses
everything."""

import json
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT, byte_chat_tokenizer, write_tiny_model

CONFIG = os.path.join(ROOT, "configs", "gsm8k.py")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), byte_chat_tokenizer())


def smoke_config(model_dir, output_dir, *extra):
    argv = [
        "prog",
        f"--config={CONFIG}",
        f"--config.output_dir={output_dir}",
        f"--config.reference.path={model_dir}",
        f"--config.learner.guide.path={model_dir}",
        "--config.data.num_train_problems=2",
        "--config.data.num_eval_problems=2",
        "--config.sampler.max_new_tokens=6",
        "--config.sampler.k=4",
        "--config.sampler.problems_per_batch=2",
        "--config.sampler.prompt_bucket=512",  # one prompt-length bucket: fewer compiles
        "--config.collect.samples_per_problem=2",
        "--config.collect.iterations=2",
        "--config.collect.problems_per_shard=1",
        "--config.eval.samples_per_problem=2",
        "--config.eval.pass_at_1_rounds=10",
        "--config.learner.max_steps=2",
        "--config.learner.batch_size=2",
        "--config.learner.buckets=(512,)",
        "--config.learner.progress_bar=False",
        "--config.eval.inv_etas=(3.0, 10.0)",
        *extra,
    ]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_train_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path, capsys):
    from qsharp_jax.qsharp import collect, loop

    out = str(tmp_path / "run")
    cfg = smoke_config(tiny_model_dir, out)
    summary = loop.run(cfg)
    results = summary["policies"]
    assert set(results) == {"pi_ref", "qsharp_iter1", "qsharp_iter2"}
    for metrics in results.values():
        assert {"pass@1", "maj1@2", "pass@2", "kl"} <= set(metrics)
        assert 0.0 <= metrics["pass@1"] <= 1.0 and np.isfinite(metrics["kl"])
    # pi_ref's own KL is > 0 already (top-p-truncated policy vs untruncated reference, spec 4.5).
    # Guided at inv_eta 10, each of the k = 4 candidates gains ln(p e^10 + 1 - p) >= 0 nats and
    # ~9.3 at the untrained guide's p ~ 0.5: over this near-uniform 256-token reference that moves
    # ~ln(256 / 4) ~ 4 nats per token; ask for at least 1 nat per generated token more.
    q, p = results["qsharp_iter2"], results["pi_ref"]
    assert q["kl"] > p["kl"] + q["mean_length"], (q, p)
    printed = capsys.readouterr().out
    assert "policy" in printed and "qsharp_iter2" in printed and "eta sweep" in printed

    # The sweep: pi_ref, then Q# (last guide) and CD (iteration-1 guide) at each 1/eta, every
    # policy on the same problems with the same key; Q# at eval.inv_eta is the headline row.
    sweep = summary["sweep"]
    assert set(sweep) == {"pi_ref", "qsharp_inv3", "qsharp_inv10", "cd_inv3", "cd_inv10"}
    unpaired = lambda m: {k: v for k, v in m.items() if not k.startswith("pass@1_vs_pi_ref")}
    assert unpaired(sweep["qsharp_inv10"]) == results["qsharp_iter2"]
    assert {(m["method"], m["inv_eta"]) for m in sweep.values()} == {
        ("pi_ref", 0.0),
        ("qsharp", 3.0),
        ("qsharp", 10.0),
        ("cd", 3.0),
        ("cd", 10.0),
    }
    eval_dir = os.path.join(out, "eval")
    samples = {}
    for name in ("pi_ref", "qsharp_iter2", "qsharp_inv3", "cd_inv3", "cd_inv10"):
        with open(os.path.join(eval_dir, f"{name}_samples.json")) as f:
            samples[name] = json.load(f)
    assert len({json.dumps(s["questions"]) for s in samples.values()}) == 1
    # each point's paired difference from pi_ref, recomputed from the two saved sample sets
    for point, name in (("qsharp_inv10", "qsharp_iter2"), ("cd_inv3", "cd_inv3")):
        diff = [np.mean(a) - np.mean(b) for a, b in zip(samples[name]["correct"], samples["pi_ref"]["correct"])]
        assert sweep[point]["pass@1_vs_pi_ref"] == pytest.approx(np.mean(diff), abs=1e-12)
    assert "pass@1_vs_pi_ref" not in sweep["pi_ref"]
    assert all(len(row) == 2 for s in samples.values() for row in s["response_ids"])
    # CD and Q# at one eta differ only in the offset formula: different samples, same problems.
    assert samples["cd_inv10"]["response_ids"] != samples["qsharp_iter2"]["response_ids"]
    for name in ("accuracy_vs_kl.png", "sweep.csv", "sweep.json"):
        assert os.path.getsize(os.path.join(eval_dir, name)) > 0
    rm = summary["reward_model"]
    assert set(rm) == {"pi_ref + Q# RM", "qsharp_iter2 + Q# RM"}
    for m in rm.values():
        assert 0.0 <= m["rm_best_of_2"] <= m["pass@2"] and 0.0 <= m["rm_maj1@2"] <= m["pass@2"]

    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["collect"]["iterations"] == 2
    it1 = [r for s in range(2) for r in collect.load_rollouts(collect.rollouts_path(out, 1, s))]
    it2 = [r for s in range(2) for r in collect.load_rollouts(collect.rollouts_path(out, 2, s))]
    assert len(it1) == len(it2) == 4 and {r.iteration for r in it2} == {2}
    assert len({r.question for r in it1}) == 2  # one problem per shard
    assert os.path.isdir(os.path.join(out, "guide", "iteration_2"))

    # A rerun reuses rollouts and evaluations; the one evaluation we delete is redone with the
    # guide restored from its finished checkpoint, and gives the same numbers; a deleted shard
    # of iteration-2 rollouts is collected again, identically.
    os.remove(os.path.join(out, "eval", "qsharp_iter2.json"))
    os.remove(collect.rollouts_path(out, 2, 1))
    again = loop.run(smoke_config(tiny_model_dir, out))["policies"]
    without_time = lambda r: {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in r.items()}
    assert without_time(again) == without_time(results)
    assert again["qsharp_iter1"] == results["qsharp_iter1"]  # read back, not recomputed
    log = capsys.readouterr().err
    assert "iteration 1: guide trained on 4 examples" in log  # needed again for the lost shard's roll-in
    assert "iteration 2: guide trained on 8 examples" in log and log.count("0 steps run") == 2  # restored
    assert "iteration 2: 4 rollouts (2 read back)" in log
    assert collect.load_rollouts(collect.rollouts_path(out, 2, 1)) == it2[2:]


def test_guide_with_another_tokenizer_fails_before_any_rollout(tiny_model_dir, tmp_path):
    from qsharp_jax.qsharp import loop

    other = write_tiny_model(str(tmp_path / "other"), byte_chat_tokenizer(("<|im_start|>", "<pad>", "<|im_end|>")))
    cfg = smoke_config(tiny_model_dir, str(tmp_path / "run"))
    with cfg.unlocked():
        cfg.learner.guide.path = other
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        loop.QSharpRun(cfg)
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "rollouts"))


def test_a_task_defined_here_runs_through_collect_learn_evaluate(tiny_model_dir, tmp_path):
    """The task interface is all the Q# pieces need: a toy task (answer: the letter after the
    question's letter) goes through collection, the learner and evaluation on the tiny model."""
    import jax

    from qsharp_jax.checkpoints import loader
    from qsharp_jax.config import learner_defaults
    from qsharp_jax.guidance import learner
    from qsharp_jax.qsharp import collect, evaluation
    from qsharp_jax.rollout.sampler import Sampler
    from qsharp_jax.rollout.state import SamplerConfig
    from qsharp_jax.tasks.base import Problem, Task
    from qsharp_jax.tasks.grading import Grader

    class NextLetter(Task):
        name = "next_letter"
        grader = Grader(matcher="strict", extraction="boxed")

        def train_problems(self):
            return [Problem(c, chr(ord(c) + 1)) for c in "abcd"]

        def eval_problems(self, split="test"):
            return [Problem(c, chr(ord(c) + 1)) for c in "xy"]

        def prompt_text(self, problem):
            return f"Which letter follows {problem.question}? Answer in \\boxed{{}}."

    task = NextLetter()
    ref = loader.load(tiny_model_dir)
    tok = ref.tokenizer
    config = SamplerConfig(max_new_tokens=6, k=4, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    train = task.train_problems()
    rollouts = collect.collect_iteration(
        Sampler(ref.model, None, config),
        tok,
        task.encode_prompts(tok, train),
        [p.question for p in train],
        [p.answer for p in train],
        iteration=1,
        num_samples=2,
        key=jax.random.key(0),
        guided=False,
        inv_eta=0.0,
        grader=task.grader,
    )
    assert len(rollouts) == 8
    for r in rollouts:
        text = tok.decode(r.prefix_ids + r.continuation_ids, skip_special_tokens=True)
        assert r.reward == task.grader.reward(text, r.gold)
    examples = collect.create_classifier_data(rollouts, drop_no_variation=False)
    c = learner_defaults()
    c.update(dict(max_steps=2, batch_size=2, buckets=(128,), compute_dtype="float32", progress_bar=False))
    c.guide.path = tiny_model_dir
    guide, _ = learner.build_guidance_model(c, reference_tokenizer=tok)
    result = learner.fit(guide, examples, c)
    assert result.steps_run == 2
    metrics = evaluation.evaluate(
        Sampler(ref.model, result.model, config), tok, task, task.eval_problems(), n=2, key=jax.random.key(1)
    )
    assert metrics["num_problems"] == 2 and 0.0 <= metrics["pass@1"] <= 1.0 and metrics["kl"] > 0.0
    assert set(metrics) >= {"pass@1_se", "maj1@2", "pass@2", "kl_se"}


def test_grpo_job_trains_each_beta_evaluates_like_the_sweep_and_resumes(tiny_model_dir, tmp_path, capsys):
    from qsharp_jax.experiments import grpo_task
    from qsharp_jax.qsharp.job_config import ConfigError

    out = str(tmp_path / "grpo")
    args = ["--config.method=grpo", "--config.grpo.betas=(0.0, 0.5)", "--config.grpo.prompts_per_step=2",
            "--config.grpo.group_size=2", "--config.grpo.save_every=1", "--config.grpo.lr=1e-2"]  # fmt: skip
    with pytest.raises(ConfigError, match="run the Q# job first"):  # token_budget -1 and no Q# rollouts
        grpo_task.run(smoke_config(tiny_model_dir, out, *args))
    cfg = smoke_config(tiny_model_dir, out, *args, "--config.grpo.token_budget=30")
    frontier = grpo_task.run(cfg)
    assert set(frontier) == {"grpo_beta0", "grpo_beta0.5"}  # no Q# sweep saved in this output_dir
    for beta, name in ((0.0, "grpo_beta0"), (0.5, "grpo_beta0.5")):
        m = frontier[name]
        assert m["method"] == "grpo" and m["beta"] == beta and m["label"] == f"β={beta:g}"
        # batches of 2 problems x 2 samples x <= 6 new tokens (<= 24 tokens) until >= 30 tokens
        assert 30 <= m["sampled_tokens"] < 30 + 24 and m["batches"] >= 2 and m["optimizer_steps"] == m["batches"]
        assert np.isfinite(m["kl"]) and m["kl"] > 0.0 and {"pass@1", "maj1@2", "pass@2"} <= set(m)
        with open(os.path.join(out, "eval", f"{name}_samples.json")) as f:
            samples = json.load(f)
        assert [len(r) for r in samples["response_ids"]] == [2, 2]
    for name in ("frontier.json", "frontier.csv", "accuracy_vs_kl.png", "config.json"):
        assert os.path.getsize(os.path.join(out, "grpo", name)) > 0
    assert "grpo_beta0.5" in capsys.readouterr().out
    assert grpo_task.run(cfg) == frontier  # a rerun reads every beta back
    assert capsys.readouterr().err.count("reusing") == 2
    one_beta = ["--config.grpo.betas=(0.5,)" if a.startswith("--config.grpo.betas") else a for a in args]
    one_beta.append("--config.grpo.token_budget=30")
    one = grpo_task.run(smoke_config(tiny_model_dir, out, *one_beta))
    assert one == {"grpo_beta0.5": frontier["grpo_beta0.5"]}  # betas may change: each has its own files
    with pytest.raises(ConfigError, match=r"changed: grpo\.mu"):
        grpo_task.run(smoke_config(tiny_model_dir, out, *one_beta, "--config.grpo.mu=2"))


def test_qsharp_collection_tokens_counts_roll_ins_and_roll_outs(tmp_path):
    from qsharp_jax.experiments.grpo_task import qsharp_collection_tokens
    from qsharp_jax.qsharp import collect

    def rollout(n_response, n_continuation, iteration):
        return collect.Rollout("q", "1", [1, 2], [5] * n_response, False, 0, [6] * n_continuation, 0.0, iteration, 0)

    collect.save_rollouts(collect.rollouts_path(str(tmp_path), 1, 0), [rollout(3, 4, 1), rollout(2, 0, 1)])
    collect.save_rollouts(collect.rollouts_path(str(tmp_path), 2, 0), [rollout(5, 1, 2)])
    assert qsharp_collection_tokens(str(tmp_path)) == 3 + 4 + 2 + 5 + 1
    assert qsharp_collection_tokens(str(tmp_path), "1") == 9
    assert qsharp_collection_tokens(str(tmp_path / "none")) == 0
