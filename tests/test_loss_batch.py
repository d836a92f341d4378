"""The loss inputs as one object (LossBatch), global totals (batch_totals: micro-batches and ranks add up
to the whole batch, every preset), whole groups, and the API's errors for bad arguments."""
import dataclasses

import pytest
import torch

import upg_kernels
from upg_kernels import LossBatch, LossConfig, UnifiedPolicyLoss, policy_loss_from_logprobs, unified_policy_loss
from upg_kernels.losses import PRESETS
from upg_kernels.losses.batch import FIELD_NAMES

from _spawn import run_world
from test_losses import make_case

ALL_PRESETS = sorted(PRESETS)


def _grads(out, *xs):
    return torch.autograd.grad(out.loss, xs)


# ----------------------------------------------------------------------------------------- A: LossBatch
def test_batch_object_equals_keyword_shorthand():
    cfg, hid, w, b, tgt, kw = make_case("hpt", dtype=torch.float64)
    h1, h2 = hid.clone().requires_grad_(True), hid.clone().requires_grad_(True)
    o1 = unified_policy_loss(h1, w, tgt, config=cfg, bias=b, backend="torch", **kw)
    o2 = unified_policy_loss(h2, w, tgt, config=cfg, bias=b, backend="torch", batch=LossBatch(**kw))
    # part in the batch, part as keywords
    rest = dict(kw)
    mask = rest.pop("loss_mask")
    o3 = UnifiedPolicyLoss(cfg, backend="torch")(hid, w, tgt, LossBatch(**rest), bias=b, loss_mask=mask)
    assert torch.equal(o1.loss, o2.loss) and torch.equal(o1.loss.detach(), o3.loss.detach())
    torch.testing.assert_close(_grads(o1, h1)[0], _grads(o2, h2)[0], rtol=0, atol=0)
    assert o1.metrics == o2.metrics
    lp = o1.logprobs.clone().requires_grad_(True)
    kw["loss_mask"] = kw["loss_mask"] & (tgt != -100)
    p1 = policy_loss_from_logprobs(lp, config=cfg, entropy=o1.entropy, batch=LossBatch(**kw))
    p2 = policy_loss_from_logprobs(lp, config=cfg, entropy=o1.entropy, **kw)
    assert torch.equal(p1.loss, p2.loss) and torch.isfinite(p1.loss)
    torch.testing.assert_close(p1.loss, o1.loss, rtol=1e-12, atol=1e-12)


def test_batch_field_errors():
    cfg, hid, w, b, tgt, kw = make_case("grpo")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['loss_msk'\]"):
        unified_policy_loss(hid, w, tgt, config=cfg, loss_msk=kw["loss_mask"], backend="torch")
    with pytest.raises(ValueError, match=r"\['loss_mask'\] given both in batch= and as keyword"):
        unified_policy_loss(hid, w, tgt, config=cfg, backend="torch", batch=LossBatch(**kw),
                            loss_mask=kw["loss_mask"])
    with pytest.raises(TypeError, match="must be a LossBatch"):
        policy_loss_from_logprobs(torch.zeros(6, 5), config=cfg, batch=dict(kw))


def test_batch_select_and_fields_have_one_owner():
    cfg, hid, w, b, tgt, kw = make_case("hpt")
    lb = LossBatch(**kw, num_items_in_batch=7)
    part = lb.select(slice(1, 3))
    assert part.is_demo.tolist() == kw["is_demo"][1:3].tolist()
    assert part.num_items_in_batch == 7 and part.loss_mask.shape == (2, 5)
    assert FIELD_NAMES == tuple(f.name for f in dataclasses.fields(LossBatch))
    assert "LossBatch" in upg_kernels.__all__ and "batch_totals" in upg_kernels.__all__


# ----------------------------------------------------------------------------------------- B: API errors
def _small(seed=0, B=4, T=3, H=8, V=11):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, generator=g, dtype=torch.float64),
            torch.randn(V, H, generator=g, dtype=torch.float64), torch.randint(0, V, (B, T), generator=g))


@pytest.mark.parametrize("name, value", [("loss_mask", torch.ones(4, 3, device="meta")),
                                         ("rewards", torch.ones(4, device="meta")),
                                         ("old_logprobs", torch.zeros(4, 3, device="meta"))])
def test_argument_on_another_device_is_named(name, value):
    h, w, t = _small()
    kw = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    kw[name] = value
    with pytest.raises(ValueError, match=rf"{name} is on meta but hidden .* is on cpu"):
        unified_policy_loss(h, w, t, config="grpo", backend="torch", **kw)
    lp = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{name} is on meta"):
        policy_loss_from_logprobs(lp, config="grpo", **kw)


@pytest.mark.parametrize("bad", [None, 1.5, "x", True])
def test_ignore_index_must_be_an_int(bad):
    h, w, t = _small()
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        unified_policy_loss(h, w, t, config="sft", backend="torch", ignore_index=bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        upg_kernels.token_logprobs(h, w, t, backend="torch", ignore_index=bad)


def test_temperature_as_0d_tensor_or_numpy_scalar_is_its_value():
    np = pytest.importorskip("numpy")
    h, w, t = _small()
    ref = unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=0.7).loss
    for temp in (torch.tensor(0.7, dtype=torch.float64), np.float32(0.7), np.float64(0.7), np.array(0.7)):
        got = unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=temp).loss
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
        lp = upg_kernels.token_logprobs(h, w, t, backend="torch", temperature=temp)
        torch.testing.assert_close(lp, upg_kernels.token_logprobs(h, w, t, backend="torch", temperature=0.7),
                                   rtol=1e-6, atol=1e-7)
    for bad, msg in ((torch.tensor([0.7]), "temperature must be a number or a 0-d real tensor"),
                     (np.array([0.7, 0.8]), "temperature must be a number"),
                     (torch.tensor(0.7, requires_grad=True), "temperature is a tensor that requires grad"),
                     ("0.7", "temperature must be a number")):
        with pytest.raises(TypeError, match=msg):
            unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=torch.tensor(0.0))


@pytest.mark.parametrize("n", [0, -3, 0.0, torch.tensor(0), torch.tensor([-1.0])])
def test_num_items_in_batch_must_be_positive(n):
    h, w, t = _small()
    kw = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, num_items_in_batch=n)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        unified_policy_loss(h, w, t, config="dapo", backend="torch", **kw)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        policy_loss_from_logprobs(torch.zeros(4, 3), config="dapo", **kw)
    with pytest.raises(TypeError, match="num_items_in_batch must be a number"):
        unified_policy_loss(h, w, t, config="dapo", backend="torch", **{**kw, "num_items_in_batch": "7"})


@pytest.mark.parametrize("preset", ["grpo", "sft", "dapo", "ppo"])
def test_demo_fields_on_presets_without_demonstrations(preset):
    with pytest.raises(ValueError, match=r"LossConfig.demo_coef=0.5 has no effect: demo_part is None"):
        LossConfig.preset(preset, demo_coef=0.5)
    with pytest.raises(ValueError, match=r"LossConfig.hpt_gamma=0.2 .* needs demo_part='sft'"):
        LossConfig.preset(preset, hpt_gamma=0.2)
    with pytest.raises(ValueError, match=r"hpt_gamma=0.2 .* needs demo_part='sft'"):
        UnifiedPolicyLoss(preset, hpt_gamma=0.2)
    assert LossConfig.preset("hpt", demo_coef=0.5, hpt_gamma=0.2).demo_coef == 0.5
    assert LossConfig.preset("luffy", demo_coef=0.5).demo_coef == 0.5
    with pytest.raises(ValueError, match="hpt_gamma"):
        LossConfig.preset("luffy", hpt_gamma=0.2)


def test_nonfinite_hidden_row_is_named():
    h, w, t = _small(B=5)
    h[3, 1, 2] = float("nan")
    h[1, 0, 0] = float("inf")
    kw = dict(advantages=torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5], dtype=torch.float64))
    # the loss: an error naming the rows (the loss and dW would be NaN)
    with pytest.raises(FloatingPointError, match=r"rows \[1, 3\] .* dW / db"):
        unified_policy_loss(h, w, t, config="grpo", backend="torch", **kw)
    lp = torch.zeros(5, 3, dtype=torch.float64)
    lp[4, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rows \[4\]"):
        policy_loss_from_logprobs(lp, config="grpo", **kw)
    # masked out, the bad rows reach nothing: finite loss and gradients
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[[1, 3]] = False
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = unified_policy_loss(hh, ww, t, config="grpo", backend="torch", loss_mask=mask, **kw)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(ww.grad).all() and torch.isfinite(hh.grad).all()
    # token_logprobs: a warning naming the rows; the other rows' logp and dh are those of a clean run
    hh = h.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"rows \[1, 3\] .* dW and db"):
        logp = upg_kernels.token_logprobs(hh, w, t, backend="torch")
    logp.sum().backward()
    keep = [0, 2, 4]
    hc = h[keep].clone().requires_grad_(True)
    lc = upg_kernels.token_logprobs(hc, w, t[keep], backend="torch")
    lc.sum().backward()
    assert torch.equal(logp[keep].detach(), lc.detach()) and torch.equal(hh.grad[keep], hc.grad)


# ----------------------------------------------------------------------------------------- C: global totals
SPLITS = [slice(0, 1), slice(1, 4), slice(4, 6)]      # uneven; row 4 (all-zero mask) in the last one


def whole_batch_case(name, seed=0):
    """make_case's float64 batch with advantages computed over the whole batch (before splitting) and
    the ignore_index positions folded into loss_mask (what batch_totals counts)."""
    from upg_kernels import group_advantages
    cfg, hid, w, b, tgt, kw = make_case(name, seed, dtype=torch.float64)
    kw["loss_mask"] = kw["loss_mask"] & (tgt != -100)
    if "rewards" in kw:
        r, gs, gid = kw.pop("rewards"), kw.pop("group_size", None), kw.pop("group_ids", None)
        demo = kw.get("is_demo")
        sel = ~demo if (demo is not None and cfg.demo_part == "sft") else torch.ones(len(r), dtype=torch.bool)
        a = torch.zeros(len(r), dtype=torch.float64)
        a[sel] = group_advantages(r[sel], group_size=gs, group_ids=None if gid is None else gid[sel],
                                  mode=cfg.advantage, eps=cfg.adv_eps)
        kw["advantages"] = a
    return cfg, hid, w, b, tgt, LossBatch(**kw)


def _loss_and_grads(cfg, hid, w, b, tgt, lb, **kw):
    h, ww, bb = (x.clone().requires_grad_(True) for x in (hid, w, b))
    out = unified_policy_loss(h, ww, tgt, config=cfg, bias=bb, backend="torch", batch=lb, **kw)
    out.loss.backward()
    return out, out.loss.detach(), h.grad, ww.grad, bb.grad


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_micro_batches_with_totals_add_up_to_the_whole_batch(name):
    cfg, hid, w, b, tgt, lb = whole_batch_case(name)
    parts = [lb.select(s) for s in SPLITS]
    totals = upg_kernels.batch_totals([p.loss_mask for p in parts],
                                      is_demo=None if lb.is_demo is None else [p.is_demo for p in parts])
    assert totals.main_rows + totals.demo_rows == 6 and totals.world_size == 1
    whole, L, dh, dw, db = _loss_and_grads(cfg, hid, w, b, tgt, lb)
    # the whole batch with its own totals is the plain call
    _, L_t, dh_t, dw_t, db_t = _loss_and_grads(cfg, hid, w, b, tgt, lb, totals=totals)
    _close(L_t, L, "whole batch with totals")
    _close(dw_t, dw, "whole batch with totals dW")
    sum_L, sum_dw, sum_db, dhs = 0.0, torch.zeros_like(w), torch.zeros_like(b), []
    for s, p in zip(SPLITS, parts):
        _, L_k, dh_k, dw_k, db_k = _loss_and_grads(cfg, hid[s], w, b, tgt[s], p, totals=totals)
        sum_L, sum_dw, sum_db = sum_L + L_k, sum_dw + dw_k, sum_db + db_k
        dhs.append(dh_k)
    _close(sum_L, L, f"{name} loss")
    _close(torch.cat(dhs), dh, f"{name} dh")
    _close(sum_dw, dw, f"{name} dW")
    _close(sum_db, db, f"{name} db")
    # the same contract from given log-probs
    lp = whole.logprobs.clone().requires_grad_(True)
    ent = whole.entropy.clone().requires_grad_(True)
    ref = policy_loss_from_logprobs(lp, config=cfg, entropy=ent, batch=lb)
    g_lp, g_ent = torch.autograd.grad(ref.loss, [lp, ent])
    acc, g_parts = 0.0, []
    for s, p in zip(SPLITS, parts):
        lp_k = whole.logprobs[s].clone().requires_grad_(True)
        ent_k = whole.entropy[s].clone().requires_grad_(True)
        o = policy_loss_from_logprobs(lp_k, config=cfg, entropy=ent_k, batch=p, totals=totals)
        acc = acc + o.loss.detach()
        g_parts.append(torch.autograd.grad(o.loss, [lp_k, ent_k]))
    _close(acc, ref.loss.detach(), f"{name} loss from log-probs")
    _close(torch.cat([g[0] for g in g_parts]), g_lp, f"{name} d/dlogp")
    _close(torch.cat([g[1] for g in g_parts]), g_ent, f"{name} d/dH")


def test_without_totals_micro_batches_do_not_add_up():
    """The reason for totals: local counts give another loss (grpo: per-call row means)."""
    cfg, hid, w, b, tgt, lb = whole_batch_case("grpo")
    L = _loss_and_grads(cfg, hid, w, b, tgt, lb)[1]
    naive = sum(_loss_and_grads(cfg, hid[s], w, b, tgt[s], lb.select(s))[1] for s in SPLITS)
    assert abs(float(naive - L)) > 1e-3 * abs(float(L))


def test_totals_errors():
    cfg, hid, w, b, tgt, lb = whole_batch_case("hpt")
    small = upg_kernels.batch_totals(lb.loss_mask[:2], is_demo=lb.is_demo[:2])
    with pytest.raises(ValueError, match="totals do not cover this call"):
        unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", batch=lb, totals=small)
    full = upg_kernels.batch_totals(lb.loss_mask, is_demo=lb.is_demo)
    with pytest.raises(ValueError, match="totals .* or num_items_in_batch .* not both"):
        unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", batch=lb, totals=full,
                            num_items_in_batch=10)
    raw = dataclasses.replace(lb, loss_mask=torch.ones(6, 5, dtype=torch.bool))   # includes ignore_index
    with pytest.raises(ValueError, match="excludes the positions whose target is ignore_index"):
        unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", batch=raw, totals=full)
    with pytest.raises(TypeError, match="totals must be a BatchTotals"):
        unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", batch=lb, totals={"main_rows": 6})
    paired = upg_kernels.batch_totals(lb.loss_mask, paired=True)
    with pytest.raises(ValueError, match="paired=True"):
        unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", batch=lb, totals=paired)
    with pytest.raises(ValueError, match="is_demo has 1 entries for 2 loss masks"):
        upg_kernels.batch_totals([lb.loss_mask, lb.loss_mask], is_demo=[lb.is_demo])
    with pytest.raises(ValueError, match="needs an initialized torch.distributed"):
        upg_kernels.batch_totals(lb.loss_mask, group=object())


def test_preference_micro_batches_with_totals_add_up():
    from upg_kernels import preference_loss
    from upg_kernels.preference.reference import preference_loss_reference
    from test_preference import make_batch
    h, w, b, t, m, ref_h, ref_w = make_batch(loss_mask=True)
    P = h.shape[0] // 2
    mask = m & (t != -100)

    def rows(s):   # the chosen and the rejected rows of pairs s
        idx = torch.arange(P)[s]
        return torch.cat([idx, idx + P])

    for name in ("dpo", "orpo", "rpo", "simpo"):
        cfg = upg_kernels.PreferenceConfig.preset(name)
        rc = torch.randn(P, dtype=torch.float64) - 8 if cfg.use_reference else None
        rr = torch.randn(P, dtype=torch.float64) - 8 if cfg.use_reference else None

        def run(idx, totals=None):
            hh, ww, bb = h[idx].clone().requires_grad_(True), w.clone().requires_grad_(True), \
                b.clone().requires_grad_(True)
            sel = idx[:len(idx) // 2]
            out = preference_loss(hh, ww, t[idx], config=cfg, loss_mask=m[idx], bias=bb, backend="torch",
                                  ref_chosen_logps=None if rc is None else rc[sel],
                                  ref_rejected_logps=None if rr is None else rr[sel], totals=totals)
            out.loss.backward()
            return out.loss.detach(), hh.grad, ww.grad, bb.grad

        splits = [slice(0, 1), slice(1, 3)]
        totals = upg_kernels.batch_totals([mask[rows(s)] for s in splits], paired=True)
        assert totals.main_rows == P and totals.paired
        L, dh, dw, db = run(rows(slice(0, P)))
        _close(L, preference_loss_reference(h, w, b, t, m, rc, rr, cfg), f"{name} vs reference")
        acc = [run(rows(s), totals) for s in splits]
        _close(sum(a[0] for a in acc), L, f"{name} loss")
        _close(sum(a[2] for a in acc), dw, f"{name} dW")
        _close(sum(a[3] for a in acc), db, f"{name} db")
        dh_parts = torch.zeros_like(dh)
        for s, a in zip(splits, acc):
            dh_parts[rows(s)] = a[1]
        _close(dh_parts, dh, f"{name} dh")
    with pytest.raises(ValueError, match="paired=True"):
        preference_loss(h, w, t, config="dpo", loss_mask=m, bias=b, backend="torch",
                        ref_chosen_logps=torch.zeros(P), ref_rejected_logps=torch.zeros(P),
                        totals=upg_kernels.batch_totals(mask))
    # totals of another (smaller) batch: the whole batch's call holds more pairs than they counted
    with pytest.raises(ValueError, match=r"totals do not cover this call \(3 pairs .* 1 and"):
        preference_loss(h, w, t, config="dpo", loss_mask=m, bias=b, backend="torch",
                        ref_chosen_logps=torch.zeros(P), ref_rejected_logps=torch.zeros(P),
                        totals=upg_kernels.batch_totals(mask[rows(slice(0, 1))], paired=True))


# ----------------------------------------------------------------------------------------- C: 2 gloo ranks
RANK_ROWS = [slice(0, 2), slice(2, 6)]                         # uneven ranks
RANK_MICRO = [[slice(0, 1), slice(1, 2)], [slice(2, 3), slice(3, 6)]]   # uneven micro-batches


class _Head(torch.nn.Module):
    """The lm_head as a module (DDP averages its gradients); the loss of one micro-batch."""

    def __init__(self, w, b, cfg):
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())
        self.bias = torch.nn.Parameter(b.clone())
        self.cfg = cfg

    def forward(self, h, tgt, lb, totals, **kw):   # kw: cp_group=, vocab_parallel= (test_parallel_totals.py)
        return unified_policy_loss(h, self.weight, tgt, config=self.cfg, bias=self.bias, backend="torch",
                                   batch=lb, totals=totals, **kw).loss


def _ddp_worker(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    res = {}
    for name in ALL_PRESETS:
        cfg, hid, w, b, tgt, lb = whole_batch_case(name)
        _, L, dh, dw, db = _loss_and_grads(cfg, hid, w, b, tgt, lb)          # the whole batch, one process
        micro = RANK_MICRO[rank]
        parts = [lb.select(s) for s in micro]
        totals = upg_kernels.batch_totals([p.loss_mask for p in parts], group=dist.group.WORLD,
                                          is_demo=None if lb.is_demo is None else [p.is_demo for p in parts])
        model = DDP(_Head(w, b, cfg))
        acc, dhs = torch.zeros((), dtype=torch.float64), []
        for k, (s, p) in enumerate(zip(micro, parts)):
            h = hid[s].clone().requires_grad_(True)
            ctx = model.no_sync() if k < len(micro) - 1 else torch.enable_grad()
            with ctx:
                loss = model(h, tgt[s], p, totals)
                (loss * totals.world_size).backward()      # DDP averages: compensate as totals say
            acc += loss.detach()
            dhs.append(h.grad)
        dist.all_reduce(acc)

        def rel(a, ref):
            return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
        rows = hid[RANK_ROWS[rank]]
        res[name] = dict(loss=rel(acc, L), dw=rel(model.module.weight.grad, dw), db=rel(model.module.bias.grad, db),
                         # dh is world_size x the rank's share: it feeds parameters that DDP averages
                         dh=rel(torch.cat(dhs) / totals.world_size, dh[RANK_ROWS[rank]]) if rows.numel() else 0.0,
                         world=totals.world_size, rows=totals.main_rows + totals.demo_rows)
    # D: batch_std over the ranks' rewards (each rank holds whole groups, uneven counts)
    from upg_kernels import group_advantages
    r = torch.tensor([1.0, 0.0, 3.0, 0.5, 2.0, 2.0, 0.0, 4.0, 1.0, 1.5], dtype=torch.float64)
    mine = slice(0, 4) if rank == 0 else slice(4, 10)
    whole = group_advantages(r, group_size=2, mode="batch_std")
    res["batch_std"] = float((group_advantages(r[mine], group_size=2, mode="batch_std", group=dist.group.WORLD)
                              - whole[mine]).abs().max())
    res["batch_std_local_differs"] = float((group_advantages(r[mine], group_size=2, mode="batch_std")
                                            - whole[mine]).abs().max())
    return res


@pytest.fixture(scope="module")
def ddp_results():
    return run_world(_ddp_worker, 2)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_two_gloo_ranks_under_ddp_equal_the_whole_batch(ddp_results, name):
    for rank in range(2):
        r = ddp_results[rank][name]
        assert r["world"] == 2 and r["rows"] == 6, r
        assert max(r["loss"], r["dw"], r["db"], r["dh"]) < 1e-10, (rank, r)


def test_batch_std_over_two_gloo_ranks(ddp_results):
    for rank in range(2):
        assert ddp_results[rank]["batch_std"] < 1e-12
        assert ddp_results[rank]["batch_std_local_differs"] > 1e-3     # per rank it would differ


# ----------------------------------------------------------------------------------------- D: whole groups
def _grpo_case(gids):
    h, w, t = _small(B=len(gids))
    r = torch.arange(len(gids), dtype=torch.float64) % 3
    return h, w, t, r, torch.tensor(gids)


def test_group_split_across_calls_is_an_error_with_totals():
    gids = [0, 0, 0, 1, 1, 1]
    h, w, t, r, g = _grpo_case(gids)
    mask = torch.ones(6, 3, dtype=torch.bool)
    splits = [slice(0, 2), slice(2, 6)]               # group 0 split 2 + 1
    totals = upg_kernels.batch_totals([mask[s] for s in splits], group_ids=[g[s] for s in splits])
    assert totals.group_count() == {0: 3, 1: 3}
    with pytest.raises(ValueError, match=r"group 0 has 2 row\(s\) in this call but 3 in the whole batch"):
        unified_policy_loss(h[:2], w, t[:2], config="grpo", backend="torch", loss_mask=mask[:2],
                            rewards=r[:2], group_ids=g[:2], totals=totals)
    # aligned calls pass, and add up to the whole batch
    whole = unified_policy_loss(h, w, t, config="grpo", backend="torch", rewards=r, group_ids=g).loss
    parts = sum(unified_policy_loss(h[s], w, t[s], config="grpo", backend="torch", loss_mask=mask[s],
                                    rewards=r[s], group_ids=g[s], totals=totals).loss
                for s in (slice(0, 3), slice(3, 6)))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_partial_group_is_an_error_without_totals():
    h, w, t, r, g = _grpo_case([0, 0, 0, 1])          # group 1: one row of its group
    with pytest.raises(ValueError, match=r"group sizes differ in this call \(group 1: 1 row"):
        unified_policy_loss(h, w, t, config="grpo", backend="torch", rewards=r, group_ids=g)
    with pytest.raises(ValueError, match="group sizes differ"):
        policy_loss_from_logprobs(torch.zeros(4, 3), config="grpo", rewards=r, group_ids=g)
    # groups of different sizes on purpose: totals of the whole batch say so
    totals = upg_kernels.batch_totals(torch.ones(4, 3), group_ids=g)
    out = unified_policy_loss(h, w, t, config="grpo", backend="torch", rewards=r, group_ids=g, totals=totals)
    assert torch.isfinite(out.loss)
    # advantages computed over whole groups are always accepted
    a = upg_kernels.group_advantages(r, group_ids=g)
    assert torch.isfinite(unified_policy_loss(h, w, t, config="grpo", backend="torch", advantages=a).loss)
    # group_size: a call whose rows are not whole groups
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 4 rewards"):
        unified_policy_loss(h, w, t, config="grpo", backend="torch", rewards=r, group_size=3)


def test_batch_std_from_rewards_in_a_part_of_the_batch_is_an_error():
    h, w, t, r, g = _grpo_case([0, 0, 1, 1, 2, 2])
    mask = torch.ones(6, 3, dtype=torch.bool)
    totals = upg_kernels.batch_totals(mask)
    with pytest.raises(ValueError, match="'batch_std' from rewards normalises by the std of the whole batch"):
        unified_policy_loss(h[:4], w, t[:4], config=LossConfig.preset("grpo", advantage="batch_std"),
                            backend="torch", loss_mask=mask[:4], rewards=r[:4], group_size=2, totals=totals)


@pytest.mark.parametrize("name", ["dapo", "hpt"])
def test_fused_epilogue_divides_by_the_totals(name):
    """The Triton path (fused epilogue: the aggregation weights per token) with totals, float32."""
    cfg, hid, w, b, tgt, lb = whole_batch_case(name)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float64 else v)
           for k, v in dataclasses.asdict(lb).items()}
    lb = LossBatch(**f32)
    hid, w, b = hid.float(), w.float(), b.float()
    parts = [lb.select(s) for s in SPLITS]
    totals = upg_kernels.batch_totals([p.loss_mask for p in parts],
                                      is_demo=None if lb.is_demo is None else [p.is_demo for p in parts])
    ref = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", batch=lb).loss
    got = sum(unified_policy_loss(hid[s], w, tgt[s], config=cfg, bias=b, backend="triton", batch=p,
                                  totals=totals, fused_epilogue=True).loss for s, p in zip(SPLITS, parts))
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "gspo", "hpt"])
def test_grad_in_forward_divides_by_the_totals(name):
    """The one-pass path (gradients in the forward) with totals: micro-batches add up (float64)."""
    cfg, hid, w, b, tgt, lb = whole_batch_case(name)
    parts = [lb.select(s) for s in SPLITS]
    totals = upg_kernels.batch_totals([p.loss_mask for p in parts],
                                      is_demo=None if lb.is_demo is None else [p.is_demo for p in parts])
    _, L, dh, dw, db = _loss_and_grads(cfg, hid, w, b, tgt, lb)
    acc = [_loss_and_grads(cfg, hid[s], w, b, tgt[s], p, totals=totals, grad_in_forward=True)
           for s, p in zip(SPLITS, parts)]
    _close(sum(a[1] for a in acc), L, f"{name} loss")
    _close(torch.cat([a[2] for a in acc]), dh, f"{name} dh")
    _close(sum(a[3] for a in acc), dw, f"{name} dW")
