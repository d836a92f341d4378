"""Context parallelism on gloo (2 ranks): each rank holds some token positions of EVERY row.

Rank 0 holds columns {0, 3}, rank 1 columns {1, 2, 4} of each [B, T=5] row (uneven and interleaved, as
load-balanced CP splits are); the per-row masks make each row's split uneven again. For every preset
(and the sequence-level rollout IS / is_ratio variants), with ``cp_group`` the sum over ranks of the
losses, the gradients w.r.t. the hidden states (each rank's columns), W and b (summed over ranks) and the
metrics equal the unsplit float64 call; the same for ``policy_loss_from_logprobs`` and for the fused
Triton epilogue (float32, interpreter). Without ``cp_group`` the split is wrong for the presets that
reduce over a sequence (checked too, so the test can fail). Last, TP x CP at world size 4: vocabulary
shards over one pair of ranks, token columns over the other.
"""
from __future__ import annotations

import pytest
import torch

from _spawn import run_world

COLS = ([0, 3], [1, 2, 4])
EXTRA = {   # name -> (preset, overrides, is_ratio kind)
    "grpo+seq_is_truncate": ("grpo", dict(rollout_is="sequence_truncate"), None),
    "gspo+seq_is_mask": ("gspo", dict(rollout_is="sequence_mask", rollout_is_cap=1.5), None),
    "vespo+token_is+is_ratio_tok": ("vespo", dict(rollout_is="token_truncate"), "token"),
    "vespo+is_ratio_row": ("vespo", {}, "row"),
    "luspo+is_ratio_tok": ("luspo", {}, "token"),
    "hpt+entropy": ("hpt", dict(entropy_coef=0.01), None),
}
# presets whose split differs without cp_group (they reduce over a sequence)
SEQUENCE_LEVEL = ("grpo", "gspo", "luspo", "vespo", "sapo", "luffy", "hpt")


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def _case(name):
    from test_losses import make_case
    from upg_kernels.losses import PRESETS
    preset, over, isr = (name, {}, None) if name in PRESETS else EXTRA[name]
    cfg, hid, w, b, tgt, kw = make_case(preset, dtype=torch.float64, overrides=over)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
          for k, v in kw.items()}
    g = torch.Generator().manual_seed(3)
    if cfg.ratio_level == "sequence":   # vary the log-ratio inside each row: a local mean then differs
        kw["old_logprobs"] = kw["old_logprobs"] + 0.05 * torch.randn(*tgt.shape, generator=g, dtype=torch.float64)
    if isr == "token":
        kw["is_ratio"] = torch.rand(*tgt.shape, generator=g, dtype=torch.float64) + 0.5
    elif isr == "row":
        kw["is_ratio"] = torch.rand(tgt.shape[0], generator=g, dtype=torch.float64) + 0.5
    return cfg, hid, w, b, tgt, kw


_PER_TOKEN = ("loss_mask", "old_logprobs", "ref_logprobs", "rollout_logprobs")


def _split_kw(kw, cols, T):
    out = {}
    for k, v in kw.items():
        per_tok = k in _PER_TOKEN or (k in ("advantages", "is_ratio") and v.dim() == 2 and v.shape[1] == T)
        out[k] = v[:, cols] if per_tok else v
    return out


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]


def _allsum(x):
    import torch.distributed as dist
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def _compare(name, rank, dtype=torch.float64, backend="torch", use_cp=True):
    import torch.distributed as dist
    import upg_kernels
    cfg, hid, w, b, tgt, kw = _case(name)
    T = tgt.shape[1]
    hr, wr, br = _leaves(hid, w, b)
    ref = upg_kernels.unified_policy_loss(hr, wr, tgt, config=cfg, bias=br, backend="torch", **kw)
    ref.loss.backward()
    cols = COLS[rank]
    kw2 = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and k != "rewards" else v)
           for k, v in _split_kw(kw, cols, T).items()}
    hs, ws, bs = _leaves(hid[:, cols].to(dtype), w.to(dtype), b.to(dtype))
    out = upg_kernels.unified_policy_loss(hs, ws, tgt[:, cols], config=cfg, bias=bs, backend=backend,
                                          cp_group=dist.group.WORLD if use_cp else None, **kw2)
    out.loss.backward()
    res = {"loss": _rel(_allsum(out.loss), ref.loss), "dh": _rel(hs.grad, hr.grad[:, cols]),
           "dW": _rel(_allsum(ws.grad), wr.grad), "db": _rel(_allsum(bs.grad), br.grad)}
    if use_cp:
        keys = [k for k in ref.metrics if k != "zero_coef_frac" or dtype == torch.float64]
        res["metrics"] = max(abs(out.metrics[k] - ref.metrics[k]) / max(abs(ref.metrics[k]), 1.0) for k in keys)
        # the same loss from given log-probs (no targets there: the ignore_index positions leave the mask)
        kw = dict(kw, loss_mask=kw["loss_mask"] & (tgt != -100))
        lp = ref.logprobs.detach().clone().requires_grad_(True)
        ent = ref.entropy.detach().clone().requires_grad_(True)
        a = upg_kernels.policy_loss_from_logprobs(lp, entropy=ent, config=cfg, **kw)
        ga, gha = torch.autograd.grad(a.loss, [lp, ent])
        lp2 = ref.logprobs[:, cols].detach().clone().requires_grad_(True)
        ent2 = ref.entropy[:, cols].detach().clone().requires_grad_(True)
        c = upg_kernels.policy_loss_from_logprobs(lp2, entropy=ent2, config=cfg, cp_group=dist.group.WORLD,
                                                  **_split_kw(kw, cols, T))
        gc, ghc = torch.autograd.grad(c.loss, [lp2, ent2])
        res["from_logprobs"] = max(_rel(_allsum(c.loss), a.loss), _rel(gc, ga[:, cols]))
        res["from_logprobs_H"] = float((ghc - gha[:, cols]).abs().max())
    return res


def _worker(rank, world):
    import torch.distributed as dist
    import upg_kernels
    from upg_kernels.losses import PRESETS
    res = {}
    for name in list(sorted(PRESETS)) + list(EXTRA):
        res[name] = _compare(name, rank)
    for name in SEQUENCE_LEVEL:
        res[f"nocp-{name}"] = _compare(name, rank, use_cp=False)
    for name in ("grpo", "dapo", "hpt"):          # the fused Triton epilogue (token-local configs)
        res[f"triton-{name}"] = _compare(name, rank, dtype=torch.float32, backend="triton")
    try:
        upg_kernels.unified_policy_loss(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                        config="sft", cp_group=dist.group.WORLD, grad_in_forward=True)
        res["gif_error"] = "no error"
    except ValueError as e:
        res["gif_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def results():
    return run_world(_worker, 2)


def _names():
    from upg_kernels.losses import PRESETS
    return sorted(PRESETS) + list(EXTRA)


@pytest.mark.parametrize("name", _names())
def test_split_sequences_equal_unsplit(results, name):
    for r in results:
        d = r[name]
        for k, v in d.items():
            tol = 1e-9 if k != "from_logprobs_H" else 1e-12
            assert v < tol, (name, k, v, d)


@pytest.mark.parametrize("name", SEQUENCE_LEVEL)
def test_without_cp_group_the_split_is_wrong(results, name):
    worst = max(max(r[f"nocp-{name}"].values()) for r in results)
    assert worst > 1e-3, (name, worst)


@pytest.mark.parametrize("name", ["grpo", "dapo", "hpt"])
def test_fused_triton_epilogue_under_cp(results, name):
    for r in results:
        for k, v in r[f"triton-{name}"].items():
            assert v < (2e-4 if k != "metrics" else 1e-4), (name, k, v)


def test_grad_in_forward_refused(results):
    for r in results:
        assert "grad_in_forward=True is not supported with cp_group" in r["gif_error"]


def test_cp_group_type_checked():
    import upg_kernels
    with pytest.raises(ValueError, match="cp_group was given but torch.distributed is not initialized"):
        upg_kernels.policy_loss_from_logprobs(torch.zeros(2, 3), config="sft", cp_group=object())


# ----------------------------------------------------------------------------- TP x CP (world 4)
def _tp_cp_worker(rank, world):
    """Ranks (cp, tp) = divmod(rank, 2): vocabulary shards over tp, token columns over cp."""
    import torch.distributed as dist
    import upg_kernels
    cp_rank, tp_rank = divmod(rank, 2)
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, cp = tp_groups[cp_rank], cp_groups[tp_rank]
    res = {}
    for name in ("gspo", "hpt+entropy", "vespo"):
        cfg, hid, w, b, tgt, kw = _case(name)
        T, V = tgt.shape[1], w.shape[0]
        hr, wr, br = _leaves(hid, w, b)
        ref = upg_kernels.unified_policy_loss(hr, wr, tgt, config=cfg, bias=br, backend="torch", **kw)
        ref.loss.backward()
        opts = upg_kernels.VocabParallelOptions.for_vocab(V, tp)
        cols, rows = COLS[cp_rank], slice(opts.start, opts.stop)
        hs, ws, bs = _leaves(hid[:, cols], w[rows], b[rows])
        out = upg_kernels.unified_policy_loss(hs, ws, tgt[:, cols], config=cfg, bias=bs, backend="torch",
                                              vocab_parallel=opts, cp_group=cp, **_split_kw(kw, cols, T))
        out.loss.backward()

        def cp_total(x):
            y = x.detach().clone()
            dist.all_reduce(y, group=cp)
            return y

        res[name] = {"loss": _rel(cp_total(out.loss), ref.loss), "dh": _rel(hs.grad, hr.grad[:, cols]),
                     "dW": _rel(cp_total(ws.grad), wr.grad[rows]), "db": _rel(cp_total(bs.grad), br.grad[rows]),
                     "metrics": max(abs(out.metrics[k] - ref.metrics[k]) / max(abs(ref.metrics[k]), 1.0)
                                    for k in ref.metrics)}
    return res


def test_tensor_and_context_parallel_together():
    for r in run_world(_tp_cp_worker, 4):
        for name, d in r.items():
            assert max(d.values()) < 1e-9, (name, d)
