"""token_logprobs: the public contract (validation, shapes, backends, custom op, compile, autocast).

Numerical accuracy of each backend against the float64 reference is in test_logprobs_triton.py.
"""
import pytest
import torch

import upg_kernels
from upg_kernels import token_logprobs, token_logprobs_reference
from upg_kernels._backend import resolve_backend


def _inputs(N=6, H=8, V=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, t


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(hidden=torch.ones(3, 4, dtype=torch.int64)), TypeError, "hidden"),
    (dict(weight=torch.ones(5, 3)), ValueError, "weight must have shape"),
    (dict(weight=torch.ones(5)), ValueError, "weight must have shape"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), ValueError, "targets must have shape"),
    (dict(targets=torch.zeros(3)), TypeError, "targets"),
    (dict(targets=torch.tensor([0, 5, 1])), ValueError, "outside"),
    (dict(targets=torch.tensor([0, -1, 1])), ValueError, "outside"),
    (dict(bias=torch.ones(4)), ValueError, "bias must have shape"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=True), ValueError, "temperature"),
    (dict(filter_eps=float("inf")), ValueError, "filter_eps"),
    (dict(filter_eps=-1.0), ValueError, "filter_eps"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(hidden=[[1.0]]), TypeError, "hidden"),
])
def test_bad_input_names_the_argument(kwargs, exc, words):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4),
                targets=torch.tensor([0, 1, 4]))
    args.update(kwargs)
    h, w, t = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=words):
        token_logprobs(h, w, t, **args)


def test_device_mismatch_is_reported():
    h, w, t = _inputs()
    meta_w = w.to("meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        token_logprobs(h, meta_w, t)


def test_env_var_sets_default_backend(monkeypatch):
    monkeypatch.setenv("UPG_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("UPG_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="UPG_KERNELS_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("UPG_KERNELS_BACKEND")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    # auto never picks Triton for float64 (the kernels take fp32/bf16/fp16)
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"


def test_empty_input_returns_empty_outputs():
    h = torch.randn(0, 7, 8, requires_grad=True)
    w = torch.randn(11, 8)
    t = torch.zeros(0, 7, dtype=torch.long)
    lp, ent = token_logprobs(h, w, t, return_entropy=True)
    assert lp.shape == (0, 7) and ent.shape == (0, 7) and lp.dtype == torch.float32
    lp.sum().backward()
    assert h.grad.shape == h.shape


def test_leading_dims_and_int32_targets():
    h, w, t = _inputs(N=12)
    lp = token_logprobs(h.view(3, 4, -1), w, t.view(3, 4).int(), backend="torch")
    ref = token_logprobs_reference(h.double(), w.double(), t)
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp.reshape(-1).double(), ref, rtol=1e-5, atol=1e-5)


def test_ignored_rows_are_zero_and_get_no_gradient():
    h, w, t = _inputs()
    t[1] = -100
    t[4] = 7
    h.requires_grad_(True)
    lp, ent = token_logprobs(h, w, t, ignore_index=-100, return_entropy=True, backend="torch")
    assert lp[1] == 0 and ent[1] == 0
    (lp.sum() + ent.sum()).backward()
    assert torch.all(h.grad[1] == 0) and torch.any(h.grad[0] != 0)


def test_nan_row_does_not_poison_other_rows():
    h, w, t = _inputs()
    h[2, 3] = float("nan")
    h.requires_grad_(True)
    w.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"non-finite log-probs / entropy at rows \[2\]"):
        lp = token_logprobs(h, w, t, backend="torch")
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4, 5]]).all()
    # a loss that masks the bad row (as a loss mask does) leaves every gradient finite
    mask = torch.ones_like(lp, dtype=torch.bool)
    mask[2] = False
    torch.where(mask, lp, torch.zeros_like(lp)).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert torch.all(h.grad[2] == 0)


def test_dtype_promotion_and_output_dtype():
    h, w, t = _inputs()
    lp = token_logprobs(h.bfloat16(), w, t, backend="torch")
    assert lp.dtype == torch.float32
    lp64 = token_logprobs(h.double(), w.double(), t, backend="torch")
    assert lp64.dtype == torch.float64


def test_autocast_casts_to_the_autocast_dtype():
    h, w, t = _inputs(N=5, H=16, V=33)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(h, w, t, backend="torch")
    ref = token_logprobs(h.bfloat16(), w.bfloat16(), t, backend="torch")
    torch.testing.assert_close(lp, ref)
    lp.sum().backward()
    assert w.grad.dtype == torch.float32  # gradient flows back to the fp32 master weight


def test_custom_op_passes_opcheck():
    h, w, t = _inputs()
    h.requires_grad_(True)
    w.requires_grad_(True)
    b = torch.randn(w.shape[0], requires_grad=True)
    torch.library.opcheck(torch.ops.upg_kernels.token_logprobs.default,
                          (h, w, b, t, 0.7, -100, 0.0, 0.0, "torch"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_without_graph_breaks():
    h, w, t = _inputs()
    h.requires_grad_(True)

    def f(h, w, t):
        lp, ent = token_logprobs(h, w, t, return_entropy=True, backend="torch")
        return (lp * 2 + 0.1 * ent).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(h, w, t)
    out.backward()
    g_compiled = h.grad.clone()
    h.grad = None
    f(h, w, t).backward()
    torch.testing.assert_close(g_compiled, h.grad)


def test_public_exports():
    assert upg_kernels.token_logprobs is token_logprobs


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_atomic"])
def test_return_lse_is_differentiable(backend):
    """return_lse: the per-token log-sum-exp (the state value V = logsumexp Q of the implicit-reward view) and its
    gradient d lse / dz = p, through every backend, against float64 autograd over materialized logits."""
    g = torch.Generator().manual_seed(11)
    N, H, V = 13, 24, 150
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    t[4] = -100
    gs = torch.randn(N, generator=g)
    gl = torch.randn(N, generator=g)

    def run(hh, ww, bb, fn):
        hh, ww, bb = (x.clone().requires_grad_() for x in (hh, ww, bb))
        lp, lse = fn(hh, ww, bb)
        (lse * gs.to(lse.dtype) + lp * gl.to(lp.dtype)).sum().backward()
        return lp, lse, hh.grad, ww.grad, bb.grad

    def ref(hh, ww, bb):
        z = (hh @ ww.T + bb) / 0.8
        l = torch.where(t != -100, torch.logsumexp(z, -1), torch.zeros(N, dtype=z.dtype))
        lp = torch.where(t != -100, z.gather(1, t.clamp(min=0)[:, None]).squeeze(1) - l,
                         torch.zeros(N, dtype=z.dtype))
        return lp, l

    ours = run(h, w, b, lambda a, c, d: upg_kernels.token_logprobs(a, c, t, bias=d, temperature=0.8,
                                                                  return_lse=True, backend=backend))
    exp = run(h.double(), w.double(), b.double(), ref)
    for a, r in zip(ours, exp):
        assert ((a.double() - r).abs().max() / r.abs().max()) < 2e-6
    lp, ent, lse = upg_kernels.token_logprobs(h, w, t, return_entropy=True, return_lse=True,
                                              backend=backend)
    assert lp.shape == ent.shape == lse.shape == (N,) and lse[4] == 0
