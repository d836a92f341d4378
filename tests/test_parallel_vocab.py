"""Vocabulary-parallel (tensor-parallel) heads on gloo, world sizes 2 and 3, uneven shards.

Each rank holds rows [start, stop) of the head (V=37 or 19: no shard size divides V). Everything is
compared with the unsharded float64 call on the full head: logp, entropy, lse and dh / dW / db of
token_logprobs (temperatures 1.0 and 0.7, softcap, bias, ignore_index rows, reduce_hidden_grad off),
the loss and gradients of every preset of unified_policy_loss, preference_loss, sequence_logprobs and the
CCE drop-in, plus the Triton backends (interpreter on CPU) and the clear errors. One spawn per world
size runs every case and returns the measured differences; the tests read them.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _spawn import ErrorMessages, run_world
from upg_kernels.kernels.backends import BACKENDS

# every backend of the table: the float64 ones are compared in float64 below, the others in float32
TRITON_BACKENDS = tuple(n for n, b in BACKENDS.items() if not b.float64)

V_TOK = 37
TOL64 = 1e-10
TOL32 = 2e-5


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]


# ----------------------------------------------------------------------------- worker
def _logprob_case(opts, rank, temp, softcap, with_bias, backend, dtype, reduce_h=True):
    import torch.distributed as dist
    import upg_kernels
    g = torch.Generator().manual_seed(11)
    h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    W = torch.randn(V_TOK, 8, generator=g, dtype=torch.float64) * 0.6
    bias = torch.randn(V_TOK, generator=g, dtype=torch.float64) * 0.3 if with_bias else None
    t = torch.randint(0, V_TOK, (3, 5), generator=g)
    t[0, 1] = -100
    t[2, :] = -100                       # a whole ignored row
    t[1] = torch.tensor([0, V_TOK - 1, 18, 19, 13])   # the ids at the shard edges (world 2: 19; 3: 13, 25)
    t[0, 2], t[0, 3] = 12, 25
    a, b, c = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    kw = dict(temperature=temp, softcap=softcap, return_entropy=True, return_lse=True)
    # the unsharded float64 call
    hr, Wr, br = _leaves(h, W, bias)
    lp, en, ls = upg_kernels.token_logprobs(hr, Wr, t, bias=br, backend="torch", **kw)
    (a * lp + b * en + c * ls).sum().backward()
    # this rank's shard
    o = dataclasses.replace(opts, reduce_hidden_grad=reduce_h)
    hs, Ws, bs = _leaves(h.to(dtype), W[opts.start:opts.stop].to(dtype),
                         None if bias is None else bias[opts.start:opts.stop].to(dtype))
    lp2, en2, ls2 = upg_kernels.token_logprobs(hs, Ws, t, bias=bs, backend=backend, vocab_parallel=o, **kw)
    (a * lp2 + b * en2 + c * ls2).sum().backward()
    dh = hs.grad
    if not reduce_h:                     # partial dh: the caller's sum over the group is the full one
        dh = dh.clone()
        dist.all_reduce(dh)
    out = {"logp": _rel(lp2, lp), "entropy": _rel(en2, en), "lse": _rel(ls2, ls), "dh": _rel(dh, hr.grad),
           "dW": _rel(Ws.grad, Wr.grad[opts.start:opts.stop])}
    if with_bias:
        out["db"] = _rel(bs.grad, br.grad[opts.start:opts.stop])
    if not reduce_h:
        out["dh_partial_differs"] = float((hs.grad - hr.grad).abs().max())
    return out


def _one_token_case(opts):
    """N = 1: a flat [1, H] input whose target lies in the last shard."""
    import upg_kernels
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, 8, generator=g, dtype=torch.float64)
    W = torch.randn(V_TOK, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([V_TOK - 2])
    hr, Wr = _leaves(h, W)
    lp, en = upg_kernels.token_logprobs(hr, Wr, t, return_entropy=True)
    (lp + 0.3 * en).sum().backward()
    hs, Ws = _leaves(h, W[opts.start:opts.stop])
    lp2, en2 = upg_kernels.token_logprobs(hs, Ws, t, return_entropy=True, vocab_parallel=opts)
    (lp2 + 0.3 * en2).sum().backward()
    return {"logp": _rel(lp2, lp), "entropy": _rel(en2, en), "dh": _rel(hs.grad, hr.grad),
            "dW": _rel(Ws.grad, Wr.grad[opts.start:opts.stop])}


def _preset_case(name, opts, backend, dtype, temp, softcap):
    import upg_kernels
    from test_losses import make_case
    cfg, hid, w, b, tgt, kw = make_case(name, dtype=torch.float64)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
          for k, v in kw.items()}
    extra = dict(temperature=temp, softcap=softcap)
    hr, wr, br = _leaves(hid, w, b)
    ref = upg_kernels.unified_policy_loss(hr, wr, tgt, config=cfg, bias=br, backend="torch", **kw, **extra)
    ref.loss.backward()
    kw2 = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and k != "rewards"
               else v) for k, v in kw.items()}
    hs, ws, bs = _leaves(hid.to(dtype), w[opts.start:opts.stop].to(dtype), b[opts.start:opts.stop].to(dtype))
    out = upg_kernels.unified_policy_loss(hs, ws, tgt, config=cfg, bias=bs, backend=backend,
                                          vocab_parallel=opts, **kw2, **extra)
    out.loss.backward()
    mk = ("loss_main", "loss_demo", "ratio_mean", "kl_mean", "entropy_mean", "adv_mean")
    return {"loss": _rel(out.loss, ref.loss), "logp": _rel(out.logprobs, ref.logprobs),
            "entropy": _rel(out.entropy, ref.entropy), "dh": _rel(hs.grad, hr.grad),
            "dW": _rel(ws.grad, wr.grad[opts.start:opts.stop]), "db": _rel(bs.grad, br.grad[opts.start:opts.stop]),
            "metrics": max(abs(out.metrics[k] - ref.metrics[k]) / max(abs(ref.metrics[k]), 1.0) for k in mk)}


def _preference_case(opts):
    import upg_kernels
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    W = torch.randn(V_TOK, 8, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V_TOK, (4, 6), generator=g)
    t[:, 0] = -100
    ref_c, ref_r = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    res = {}
    for preset in ("dpo", "simpo", "orpo"):
        kw = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r) if preset == "dpo" else {}
        hr, Wr = _leaves(h, W)
        a = upg_kernels.preference_loss(hr, Wr, t, config=preset, backend="torch", **kw)
        a.loss.backward()
        hs, Ws = _leaves(h, W[opts.start:opts.stop])
        b = upg_kernels.preference_loss(hs, Ws, t, config=preset, backend="torch", vocab_parallel=opts, **kw)
        b.loss.backward()
        res[preset] = max(_rel(b.loss, a.loss), _rel(hs.grad, hr.grad), _rel(Ws.grad, Wr.grad[opts.start:opts.stop]))
    sa = upg_kernels.sequence_logprobs(h, W, t, average=True)
    sb = upg_kernels.sequence_logprobs(h, W[opts.start:opts.stop], t, average=True, vocab_parallel=opts)
    res["sequence_logprobs"] = _rel(sb, sa)
    return res


@dataclasses.dataclass
class _CCEOptions:            # the fields of cut_cross_entropy.VocabParallelOptions
    start: int
    stop: int
    group: object = None
    reduce_e_grad: bool = True


def _cce_case(opts):
    from upg_kernels import linear_cross_entropy
    g = torch.Generator().manual_seed(9)
    e = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    c = torch.randn(V_TOK, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, V_TOK, (2, 7), generator=g)
    t[0, 3] = -100
    res = {}
    for kind, o in (("ours", opts), ("cce", _CCEOptions(opts.start, opts.stop, opts.group))):
        er, cr = _leaves(e, c)
        a = linear_cross_entropy(er, cr, t, shift=1, softcap=4.0, backend="torch")
        a.backward()
        es, cs = _leaves(e, c[opts.start:opts.stop])
        b = linear_cross_entropy(es, cs, t, shift=1, softcap=4.0, backend="torch", vocab_parallel_options=o)
        b.backward()
        res[kind] = max(_rel(b, a), _rel(es.grad, er.grad), _rel(cs.grad, cr.grad[opts.start:opts.stop]))
    return res


def _errors(rank, world, opts):
    import upg_kernels
    from upg_kernels import VocabParallelOptions as VPO
    h = torch.randn(4, 8, dtype=torch.float64)
    W = torch.randn(opts.local_size, 8, dtype=torch.float64)
    res = ErrorMessages()
    catch = res.catch

    # shards that overlap (every rank claims [0, local)) / leave a gap (the last rank starts one late)
    catch("overlap", lambda: upg_kernels.token_logprobs(h, W, torch.zeros(4, dtype=torch.long),
                                                        vocab_parallel=VPO(0, opts.local_size)))
    s, e = (opts.start + 1, opts.stop + 1) if rank == world - 1 else (opts.start, opts.stop)
    catch("gap", lambda: upg_kernels.token_logprobs(h, W, torch.zeros(4, dtype=torch.long),
                                                    vocab_parallel=VPO(s, e)))
    catch("target_range", lambda: upg_kernels.token_logprobs(h, W, torch.tensor([0, 1, V_TOK, 2]),
                                                             vocab_parallel=opts))
    catch("weight_rows", lambda: upg_kernels.token_logprobs(h, W[:-1], torch.zeros(4, dtype=torch.long),
                                                            vocab_parallel=opts))
    catch("not_options", lambda: upg_kernels.token_logprobs(h, W, torch.zeros(4, dtype=torch.long),
                                                            vocab_parallel=(opts.start, opts.stop)))
    t = torch.zeros(4, dtype=torch.long)
    catch("fused", lambda: upg_kernels.unified_policy_loss(h, W, t, config="sft", vocab_parallel=opts,
                                                           fused_epilogue=True))
    catch("grad_in_forward", lambda: upg_kernels.unified_policy_loss(h, W, t, config="sft", vocab_parallel=opts,
                                                                     grad_in_forward=True))
    return res


def _worker(rank, world):
    from upg_kernels import VocabParallelOptions
    from upg_kernels.losses import PRESETS
    opts = VocabParallelOptions.for_vocab(V_TOK, None)
    res = {"span": [opts.start, opts.stop]}
    for temp in (1.0, 0.7):
        for softcap in (None, 2.5):
            for with_bias in (False, True):
                res[f"lp-torch-t{temp}-c{softcap}-b{with_bias}"] = _logprob_case(
                    opts, rank, temp, softcap, with_bias, "torch", torch.float64)
    res["lp-one-token"] = _one_token_case(opts)
    res["lp-partial-dh"] = _logprob_case(opts, rank, 0.7, None, True, "torch", torch.float64, reduce_h=False)
    for backend in TRITON_BACKENDS:
        res[f"lp32-{backend}"] = _logprob_case(opts, rank, 0.7, 2.5, True, backend, torch.float32)
    small = VocabParallelOptions.for_vocab(19)          # make_case's V
    for i, name in enumerate(sorted(PRESETS)):
        temp, softcap = (0.7, 3.0) if i % 2 else (1.0, None)
        res[f"preset-{name}"] = _preset_case(name, small, "torch", torch.float64, temp, softcap)
    for name in ("grpo", "gspo", "hpt"):
        res[f"preset32-triton-{name}"] = _preset_case(name, small, "triton", torch.float32, 0.7, None)
    res["preference"] = _preference_case(opts)
    res["cce"] = _cce_case(opts)
    res["errors"] = _errors(rank, world, opts)
    return res


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request):
    return run_world(_worker, request.param)


def test_shards_are_uneven_and_tile(results):
    spans = [r["span"] for r in results]
    assert spans[0][0] == 0 and spans[-1][1] == V_TOK
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert len({s[1] - s[0] for s in spans}) > 1 or V_TOK % len(spans)  # 37 over 2 or 3: uneven


def _check(d, tol):
    for k, v in d.items():
        if k == "dh_partial_differs":
            continue
        assert v < tol, (k, v, d)


def test_token_logprobs_match_unsharded_float64(results):
    for r in results:
        cases = [k for k in r if k.startswith("lp-torch")]
        assert len(cases) == 8
        for k in cases:
            _check(r[k], TOL64)


def test_one_token(results):
    for r in results:
        _check(r["lp-one-token"], TOL64)


def test_partial_hidden_grad(results):
    for r in results:
        _check(r["lp-partial-dh"], TOL64)
        assert r["lp-partial-dh"]["dh_partial_differs"] > 1e-3   # the shard's own dh is not the full one


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_backends(results, backend):
    for r in results:
        _check(r[f"lp32-{backend}"], TOL32)


def test_every_preset_matches_unsharded(results):
    from upg_kernels.losses import PRESETS
    for r in results:
        for name in PRESETS:
            _check(r[f"preset-{name}"], 1e-9)


def test_presets_triton_float32(results):
    for r in results:
        for name in ("grpo", "gspo", "hpt"):
            _check(r[f"preset32-triton-{name}"], 1e-4)


def test_preference_and_sequence_logprobs(results):
    for r in results:
        _check(r["preference"], TOL64)


def test_cce_drop_in(results):
    for r in results:
        _check(r["cce"], TOL64)


@pytest.mark.parametrize("key,match", [
    ("overlap", "do not tile the vocabulary"), ("gap", "do not tile the vocabulary"),
    ("target_range", "outside \\[0, V=37\\)"), ("weight_rows", "rows \\[start="),
    ("not_options", "VocabParallelOptions"), ("fused", "fused_epilogue=True is not supported"),
    ("grad_in_forward", "grad_in_forward=True is not supported")])
def test_clear_errors(results, key, match):
    import re
    for r in results:
        assert re.search(match, r["errors"][key]), r["errors"][key]


def test_single_process_errors():
    import upg_kernels
    with pytest.raises(ValueError, match="initialized"):
        upg_kernels.token_logprobs(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long),
                                   vocab_parallel=upg_kernels.VocabParallelOptions(0, 3))
