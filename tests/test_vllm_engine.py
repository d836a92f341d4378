"""VLLMEngine's logic against a fake ``vllm`` module injected into ``sys.modules``.

vLLM itself cannot run here (no CUDA); these tests check the mapping from the RolloutEngine protocol
to vLLM's offline API: the ``LLM`` construction arguments, one request per prompt with ``n`` (or one
seeded request per sample), log-prob extraction, output ordering and grouping, finish reasons, and the
order of sleep / wake_up(tags) / load_weights / reset_prefix_cache calls.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("transformers")

VOCAB = 50
EOS = 3


# ----------------------------------------------------------------------------- the fake vllm
@dataclass
class FakeLogprob:
    logprob: float
    rank: int = 1
    decoded_token: str | None = None


@dataclass
class FakeCompletion:
    index: int
    token_ids: list
    logprobs: list | None
    finish_reason: str
    text: str = ""


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list
    outputs: list = field(default_factory=list)


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw
        self.n = kw.get("n", 1)
        self.seed = kw.get("seed")


class FakeInnerModel:
    def __init__(self, log):
        self.log = log
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        names = []
        for name, t in weights:  # consumes the generator like vLLM does
            self.loaded[name] = t.detach().clone()
            names.append(name)
        self.log.append(("load_weights", len(names)))
        return set(names)


def _fake_tokens(prompt, k, max_tokens, seed):
    """Deterministic pseudo-sample: depends on the prompt, the sample index k and the seed."""
    base = sum(prompt) * 7 + k * 13 + (seed or 0)
    toks = []
    for t in range(max_tokens):
        tok = (base + 11 * t) % VOCAB
        toks.append(tok)
        if tok == EOS:
            break
    return toks


def make_fake_vllm(accept_logprobs_mode=True, accept_tags=True, shuffle=True, bad=None):
    mod = types.ModuleType("vllm")
    log: list = []
    mod.log = log
    mod.instances = []

    class LLM:
        def __init__(self, **kw):
            if "logprobs_mode" in kw and accept_logprobs_mode is False:
                raise TypeError("EngineArgs.__init__() got an unexpected keyword argument 'logprobs_mode'")
            if "logprobs_mode" in kw and accept_logprobs_mode == "raw_only":
                raise ValueError("logprobs_mode: Input should be 'raw_logprobs' or 'raw_logits'")
            if kw.get("max_model_len") == -1:
                raise ValueError("max_model_len must be positive")
            self.kw = kw
            self.inner = FakeInnerModel(log)
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.inner))))
            log.append(("init", kw.get("logprobs_mode")))
            mod.instances.append(self)

        def sleep(self, level=1):
            log.append(("sleep", level))

        def wake_up(self, tags=None):
            if tags is not None and not accept_tags:
                raise TypeError("wake_up() got an unexpected keyword argument 'tags'")
            log.append(("wake_up", tuple(tags) if tags else None))

        def reset_prefix_cache(self):
            log.append(("reset_prefix_cache",))

        def generate(self, prompts, sampling_params, use_tqdm=True):
            assert isinstance(prompts, list) and isinstance(sampling_params, list)
            assert len(prompts) == len(sampling_params)
            log.append(("generate", len(prompts)))
            outs = []
            for p, sp in zip(prompts, sampling_params):
                assert set(p) == {"prompt_token_ids"}
                kw = sp.kw
                assert kw["logprobs"] == 0 and kw["detokenize"] is False and kw["stop_token_ids"]
                comps = []
                for k in range(sp.n):
                    toks = _fake_tokens(p["prompt_token_ids"], k, kw["max_tokens"], sp.seed)
                    lps = [{tok: FakeLogprob(-0.01 * (pos + 1) - 0.001 * k)} for pos, tok in enumerate(toks)]
                    reason = "stop" if toks[-1] == EOS else "length"
                    if bad == "short_logprobs":
                        lps = lps[:-1]
                    if bad == "abort":
                        reason = "abort"
                    comps.append(FakeCompletion(index=k, token_ids=toks, logprobs=lps, finish_reason=reason))
                if shuffle:
                    comps = comps[::-1]  # vLLM does not promise index order
                outs.append(FakeRequestOutput(prompt_token_ids=p["prompt_token_ids"], outputs=comps))
            return outs

    mod.LLM = LLM
    mod.SamplingParams = FakeSamplingParams
    return mod


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def pretend_cuda(monkeypatch):
    """The engine refuses to start without CUDA; the fake vLLM needs none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.fixture()
def tiny():
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    tok = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=0)
    return model, tok


def _engine(monkeypatch, tiny, **fake_kw):
    fake = make_fake_vllm(**fake_kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")  # recorded, so restored after the test
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    model, tok = tiny
    eng = VLLMEngine(model, tok, gpu_memory_utilization=0.25, max_model_len=256)
    return eng, fake


# ----------------------------------------------------------------------------- tests
def test_missing_vllm_is_a_clear_error(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    with pytest.raises(ImportError, match=r"pip install upg-kernels\[vllm\]"):
        VLLMEngine(*tiny)
    with pytest.raises(RuntimeError, match="needs vLLM and a CUDA GPU"):  # what the CLI reports
        VLLMEngine(*tiny)


def test_no_cuda_is_a_clear_error(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    with pytest.raises(RuntimeError, match="no CUDA device"):
        VLLMEngine(*tiny)


def test_make_engine_reaches_vllm_engine(monkeypatch, tiny):
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from upg_trainer.rollout import make_engine
    from upg_trainer.rollout.base import RolloutEngine
    eng = make_engine("vllm", *tiny, gpu_memory_utilization=0.2, batch_size=64)
    assert isinstance(eng, RolloutEngine)
    assert fake.instances[0].kw["gpu_memory_utilization"] == 0.2


def test_construction_arguments_and_initial_weight_push(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    llm = fake.instances[0]
    kw = llm.kw
    assert kw["enable_sleep_mode"] is True and kw["gpu_memory_utilization"] == 0.25
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] is True
    assert kw["max_model_len"] == 256 and kw["dtype"] == "float32" and kw["tensor_parallel_size"] == 1
    assert kw["logprobs_mode"] == "processed_logprobs" and eng.logprobs_mode == "processed_logprobs"
    assert os.path.isfile(os.path.join(kw["model"], "config.json"))  # config written for vLLM
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    assert "distributed_executor_backend" not in kw  # single process
    # the trainer's weights were pushed once, with transformers names, values equal
    model = tiny[0]
    params = dict(model.named_parameters())
    assert set(llm.inner.loaded) == set(params)  # tied lm_head is not sent twice
    for n, p in params.items():
        assert torch.equal(llm.inner.loaded[n], p.detach())
    assert fake.log[:3] == [("init", "processed_logprobs"), ("load_weights", len(params)), ("reset_prefix_cache",)]
    assert eng.eos_ids == [EOS]


def test_generate_groups_and_logprobs(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    prompts = [[5, 6, 7], [8, 9], [10]]
    n = 4
    out = eng.generate(prompts, n=n, max_new_tokens=6, temperature=0.7, top_p=1.0)
    assert len(out) == len(prompts) * n
    assert ("generate", len(prompts)) in fake.log  # one request per prompt, n samples each
    for i, p in enumerate(prompts):
        for j in range(n):
            r = out[i * n + j]
            want = _fake_tokens(p, j, 6, None)  # sample j of prompt i, whatever order vLLM returned
            assert r.prompt_index == i and r.prompt_ids == p and r.completion_ids == want
            assert r.logprobs == pytest.approx([-0.01 * (t + 1) - 0.001 * j for t in range(len(want))])
            assert r.finish_reason == ("stop" if want[-1] == EOS else "length")
            assert r.extra["logprobs_mode"] == "processed_logprobs"
    assert {r.finish_reason for r in out} == {"stop", "length"}  # both paths exercised


def test_sampling_params_mapping(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    seen = []
    orig = fake.instances[0].generate

    def spy(prompts, sps, use_tqdm=True):
        seen.extend(sps)
        return orig(prompts, sps, use_tqdm)

    fake.instances[0].generate = spy
    eng.generate([[1, 2]], n=3, max_new_tokens=9, temperature=1.0, top_p=0.9)
    (sp,) = seen
    assert sp.kw == dict(n=3, temperature=1.0, top_p=0.9, max_tokens=9, logprobs=0,
                         stop_token_ids=[EOS], detokenize=False)


def test_seeded_requests_are_per_sample_and_reproducible(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    prompts = [[5, 6, 7], [8, 9]]
    a = eng.generate(prompts, n=3, max_new_tokens=5, seed=123)
    assert ("generate", 6) in fake.log  # len(prompts) * n requests with n=1
    b = eng.generate(prompts, n=3, max_new_tokens=5, seed=123)
    c = eng.generate(prompts, n=3, max_new_tokens=5, seed=124)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    assert [r.prompt_index for r in a] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(r.completion_ids) for r in a[:3]}) == 3  # distinct seeds per sample


def test_sleep_wake_sync_order(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    model = tiny[0]
    fake.log.clear()
    eng.generate([[1, 2, 3]], n=2, max_new_tokens=4)   # already awake, weights current: no wake_up
    eng.sleep()
    eng.sleep()                                          # idempotent
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)                                  # "optimizer step" (first mini-batch)
    eng.sync_weights(model)                              # deferred: nothing happens yet
    assert fake.log == [("generate", 1), ("sleep", 1)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)                                  # second mini-batch
    eng.sync_weights(model)
    eng.wake()                                           # weights woken alone, pushed once, then KV cache
    eng.wake()                                           # idempotent
    eng.generate([[1, 2, 3]], n=2, max_new_tokens=4)
    nparams = len(list(model.parameters()))
    assert fake.log == [
        ("generate", 1), ("sleep", 1),
        ("wake_up", ("weights",)), ("load_weights", nparams), ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)), ("generate", 1),
    ]
    inner = fake.instances[0].inner
    for n, p in model.named_parameters():
        assert torch.equal(inner.loaded[n], p.detach())  # the latest weights


def test_generate_pushes_stale_weights_when_awake(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    fake.log.clear()
    eng.sync_weights(tiny[0])
    eng.generate([[1]], n=1, max_new_tokens=2)
    nparams = len(list(tiny[0].parameters()))
    assert fake.log == [("load_weights", nparams), ("reset_prefix_cache",), ("generate", 1)]


def test_generate_wakes_a_sleeping_engine(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    eng.sleep()
    fake.log.clear()
    eng.generate([[4]], n=1, max_new_tokens=2)
    assert fake.log == [("wake_up", None), ("generate", 1)]


def test_wake_up_without_tags_falls_back(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny, accept_tags=False)
    eng.sleep()
    fake.log.clear()
    eng.sync_weights(tiny[0])
    eng.wake()  # untagged wake_up wakes everything: no second wake_up for the KV cache
    assert fake.log[0] == ("wake_up", None) and [e for e in fake.log if e[0] == "wake_up"] == [("wake_up", None)]


def test_sleep_level_2_repushes_on_wake(monkeypatch, tiny):
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    eng = VLLMEngine(*tiny, sleep_level=2)
    eng.generate([[1]], n=1, max_new_tokens=2)
    eng.sleep()
    assert fake.log[-1] == ("sleep", 2)
    fake.log.clear()
    eng.generate([[1]], n=1, max_new_tokens=2)  # weights were dropped: pushed again without a sync_weights call
    nparams = len(list(tiny[0].parameters()))
    assert fake.log == [("wake_up", ("weights",)), ("load_weights", nparams), ("reset_prefix_cache",),
                        ("wake_up", ("kv_cache",)), ("generate", 1)]


@pytest.mark.parametrize("accept", [False, "raw_only"])
def test_old_vllm_raw_logprobs(monkeypatch, tiny, accept):
    eng, fake = _engine(monkeypatch, tiny, accept_logprobs_mode=accept)
    assert eng.logprobs_mode == "raw_logprobs" and "logprobs_mode" not in fake.instances[0].kw
    r1 = eng.generate([[1, 2]], n=2, max_new_tokens=3, temperature=1.0)
    assert all(r.logprobs is not None and r.extra["logprobs_mode"] == "untempered" for r in r1)
    with pytest.warns(UserWarning, match="before temperature"):
        r2 = eng.generate([[1, 2]], n=2, max_new_tokens=3, temperature=0.6)
    assert all(r.logprobs is None for r in r2)


def test_top_p_marks_renormalised_logprobs(monkeypatch, tiny):
    eng, _ = _engine(monkeypatch, tiny)
    out = eng.generate([[1, 2]], n=1, max_new_tokens=3, top_p=0.8)
    assert out[0].extra["logprobs_mode"] == "processed_logprobs_top_p_renormalised"


@pytest.mark.parametrize("bad,match", [("short_logprobs", "log-prob entries"), ("abort", "abort")])
def test_malformed_outputs_are_errors(monkeypatch, tiny, bad, match):
    eng, _ = _engine(monkeypatch, tiny, bad=bad)
    with pytest.raises(RuntimeError, match=match):
        eng.generate([[1, 2]], n=2, max_new_tokens=3)


def test_argument_checks(monkeypatch, tiny):
    eng, _ = _engine(monkeypatch, tiny)
    assert eng.generate([], n=2, max_new_tokens=3) == []
    with pytest.raises(ValueError, match="temperature"):
        eng.generate([[1]], n=2, max_new_tokens=3, temperature=-1.0)
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    with pytest.raises(NotImplementedError):
        VLLMEngine(*tiny, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine(*tiny, sleep_level=3)


def test_model_path_dir_is_used_when_it_has_a_config(monkeypatch, tiny, tmp_path):
    model, tok = tiny
    model.config.save_pretrained(tmp_path)
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    model.name_or_path = str(tmp_path)
    VLLMEngine(model, tok)
    assert fake.instances[0].kw["model"] == str(tmp_path)


def test_greedy_is_one_request_repeated(monkeypatch, tiny):
    eng, fake = _engine(monkeypatch, tiny)
    seen = []
    orig = fake.instances[0].generate

    def spy(prompts, sps, use_tqdm=True):
        seen.extend(sps)
        return orig(prompts, sps, use_tqdm)

    fake.instances[0].generate = spy
    out = eng.generate([[1, 2], [3]], n=3, max_new_tokens=4, temperature=0.0, top_p=0.5, seed=7)
    assert [sp.kw for sp in seen] == [dict(n=1, temperature=0.0, max_tokens=4, logprobs=0,
                                           stop_token_ids=[EOS], detokenize=False)] * 2
    assert len(out) == 6 and [r.prompt_index for r in out] == [0, 0, 0, 1, 1, 1]
    assert out[0].completion_ids == out[1].completion_ids == out[2].completion_ids
    assert out[0].completion_ids is not out[1].completion_ids
    assert out[0].logprobs is not None and out[0].extra["logprobs_mode"] == "untempered"


def test_other_construction_errors_are_not_swallowed(monkeypatch, tiny):
    fake = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from upg_trainer.rollout.vllm_engine import VLLMEngine
    with pytest.raises(ValueError, match="max_model_len"):
        VLLMEngine(*tiny, max_model_len=-1)
    assert len(fake.instances) == 0
