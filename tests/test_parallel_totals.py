"""Global totals (``batch_totals`` / ``totals=``) with context and tensor (vocabulary) parallelism, gloo,
world size 4 = 2 data-parallel (DP) ranks x 2 inner ranks (context-parallel, then tensor-parallel).

Ranks ``(dp, inner) = divmod(rank, 2)``: DP groups {0, 2}, {1, 3} hold different rows (``RANK_ROWS`` of
test_loss_batch: 2 and 4 rows, each rank split into its own uneven micro-batches ``RANK_MICRO``); inner
groups {0, 1}, {2, 3} hold the same rows.

* DP x CP, every preset: each CP rank holds the token columns ``COLS`` of test_parallel_context ({0, 3}
  and {1, 2, 4}) of its DP rank's rows; one row's mask is all zero (row 4), another's only on CP rank 0
  (row 5). ``batch_totals(..., group=dp, cp_group=cp)`` counts each row once and the tokens of every CP
  rank; one DDP over all 4 ranks averages the gradients, compensated by ``world_size * cp_size``. The sum
  over all ranks and micro-batches of the losses, the DDP-averaged dW and db, and each rank's dh equal the
  whole-batch single-process float64 call. Also (5 presets) the other layout: DDP over the DP group,
  compensated by ``world_size``, the CP ranks' gradients summed by hand.
* DP x TP, every preset: each TP rank holds its rows of the head (V=19: shards of 10 and 9); the totals
  count over the DP group only (TP ranks hold the same tokens); DDP over the DP group, compensated by
  ``world_size``; also DPO through ``preference_loss(..., vocab_parallel=, totals=)``.
* The errors for totals and groups that do not fit.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _spawn import run_world
from test_loss_batch import ALL_PRESETS, RANK_MICRO, RANK_ROWS, _Head, _loss_and_grads, whole_batch_case
from test_parallel_context import COLS, _rel, _split_kw

TOL = 1e-10
DDP_OVER_DP = ("grpo", "gspo", "hpt", "luffy", "vespo")   # the other gradient layout, a representative set


def _groups(rank):
    """``(dp rank, inner rank, dp group, inner group)``; every rank creates every group, in one order."""
    import torch.distributed as dist
    dp_rank, inner = divmod(rank, 2)
    inner_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return dp_rank, inner, dp_groups[inner], inner_groups[dp_rank]


def _case(name):
    """test_loss_batch's whole batch; row 5 also loses its mask on CP rank 0's columns."""
    cfg, hid, w, b, tgt, lb = whole_batch_case(name)
    mask = lb.loss_mask.clone()
    mask[5, COLS[0]] = False
    return cfg, hid, w, b, tgt, dataclasses.replace(lb, loss_mask=mask)


def _columns(lb, cols, T):
    fields = {k: v for k, v in vars(lb).items() if v is not None}
    return type(lb)(**_split_kw(fields, cols, T))


def _sum(x, group):
    import torch.distributed as dist
    y = x.detach().clone()
    dist.all_reduce(y, group=group)
    return y


def _dp_cp(name, dp_rank, cp_rank, dp, cp, ddp_over="all"):
    """``ddp_over="all"``: one DDP over every DP and CP rank (loss x ``world_size * cp_size``); ``"dp"``: DDP
    over the DP group (loss x ``world_size``), the CP ranks' gradients then summed by hand."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import upg_kernels
    cfg, hid, w, b, tgt, lb = _case(name)
    _, L, dh, dw, db = _loss_and_grads(cfg, hid, w, b, tgt, lb)       # the whole batch, one process
    T, cols, micro = tgt.shape[1], COLS[cp_rank], RANK_MICRO[dp_rank]
    parts = [_columns(lb.select(s), cols, T) for s in micro]
    totals = upg_kernels.batch_totals([p.loss_mask for p in parts], group=dp, cp_group=cp,
                                      is_demo=None if lb.is_demo is None else [p.is_demo for p in parts])
    whole = upg_kernels.batch_totals(lb.loss_mask, is_demo=lb.is_demo)
    if ddp_over == "all":
        model = DDP(_Head(w, b, cfg))                  # one gradient all-reduce over every DP and CP rank
        scale = totals.world_size * totals.cp_size
    else:
        model = DDP(_Head(w, b, cfg), process_group=dp)
        scale = totals.world_size
    acc, dhs = torch.zeros((), dtype=torch.float64), []
    for k, (s, p) in enumerate(zip(micro, parts)):
        h = hid[s][:, cols].clone().requires_grad_(True)
        with model.no_sync() if k < len(micro) - 1 else torch.enable_grad():
            loss = model(h, tgt[s][:, cols], p, totals, cp_group=cp)
            (loss * scale).backward()
        acc += loss.detach()
        dhs.append(h.grad)
    dw_k, db_k = model.module.weight.grad, model.module.bias.grad
    if ddp_over == "dp":
        dw_k, db_k = _sum(dw_k, cp), _sum(db_k, cp)
    return dict(loss=_rel(_sum(acc, dist.group.WORLD), L), dw=_rel(dw_k, dw), db=_rel(db_k, db),
                dh=_rel(torch.cat(dhs) / scale, dh[RANK_ROWS[dp_rank]][:, cols]),
                counts=[totals.main_tokens, totals.demo_tokens, totals.main_rows, totals.demo_rows,
                        totals.world_size, totals.cp_size],
                whole=[whole.main_tokens, whole.demo_tokens, whole.main_rows, whole.demo_rows, 2, 2])


def _dp_tp(name, dp_rank, dp, tp):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import upg_kernels
    cfg, hid, w, b, tgt, lb = whole_batch_case(name)
    _, L, dh, dw, db = _loss_and_grads(cfg, hid, w, b, tgt, lb)
    opts = upg_kernels.VocabParallelOptions.for_vocab(w.shape[0], tp)
    rows, micro = slice(opts.start, opts.stop), RANK_MICRO[dp_rank]
    parts = [lb.select(s) for s in micro]
    totals = upg_kernels.batch_totals([p.loss_mask for p in parts], group=dp,    # the DP group only
                                      is_demo=None if lb.is_demo is None else [p.is_demo for p in parts])
    model = DDP(_Head(w[rows], b[rows], cfg), process_group=dp)   # the shard's gradients: over DP only
    acc, dhs = torch.zeros((), dtype=torch.float64), []
    for k, (s, p) in enumerate(zip(micro, parts)):
        h = hid[s].clone().requires_grad_(True)
        with model.no_sync() if k < len(micro) - 1 else torch.enable_grad():
            loss = model(h, tgt[s], p, totals, vocab_parallel=opts)
            (loss * totals.world_size).backward()
        acc += loss.detach()
        dhs.append(h.grad)
    return dict(loss=_rel(_sum(acc, dp), L), dw=_rel(model.module.weight.grad, dw[rows]),
                db=_rel(model.module.bias.grad, db[rows]),
                dh=_rel(torch.cat(dhs) / totals.world_size, dh[RANK_ROWS[dp_rank]]),
                shard=opts.local_size, world=totals.world_size)


def _dpo_tp(dp_rank, dp, tp):
    """DPO, 3 pairs: DP rank 0 holds pair 0, rank 1 pairs 1 and 2 as two micro-batches."""
    import upg_kernels
    from test_preference import make_batch
    h, w, b, t, m, _, _ = make_batch(loss_mask=True)
    P = h.shape[0] // 2
    g = torch.Generator().manual_seed(4)
    rc, rr = torch.randn(P, generator=g, dtype=torch.float64) - 8, torch.randn(P, generator=g, dtype=torch.float64) - 8

    def rows(s):
        idx = torch.arange(P)[s]
        return torch.cat([idx, idx + P])

    def run(idx, ww, bb, **kw):
        hh, ww, bb = (x.clone().requires_grad_(True) for x in (h[idx], ww, bb))
        sel = idx[:len(idx) // 2]
        out = upg_kernels.preference_loss(hh, ww, t[idx], config="dpo", loss_mask=m[idx], bias=bb, backend="torch",
                                          ref_chosen_logps=rc[sel], ref_rejected_logps=rr[sel], **kw)
        out.loss.backward()
        return out.loss.detach(), hh.grad, ww.grad, bb.grad

    L, dh, dw, db = run(rows(slice(0, P)), w, b)
    opts = upg_kernels.VocabParallelOptions.for_vocab(w.shape[0], tp)
    vr = slice(opts.start, opts.stop)
    micro = [[slice(0, 1)], [slice(1, 2), slice(2, 3)]][dp_rank]
    totals = upg_kernels.batch_totals([(m & (t != -100))[rows(s)] for s in micro], paired=True, group=dp)
    acc = [run(rows(s), w[vr], b[vr], vocab_parallel=opts, totals=totals) for s in micro]
    mine = torch.cat([rows(s) for s in micro])
    return dict(loss=_rel(_sum(sum(a[0] for a in acc), dp), L), dw=_rel(_sum(sum(a[2] for a in acc), dp), dw[vr]),
                db=_rel(_sum(sum(a[3] for a in acc), dp), db[vr]),
                dh=_rel(torch.cat([a[1] for a in acc]), dh[mine]), pairs=totals.main_rows)


def _errors(dp_rank, cp_rank, dp, cp):
    import upg_kernels
    res = {}

    def catch(key, fn):
        try:
            fn()
            res[key] = "no error"
        except (ValueError, TypeError) as e:
            res[key] = str(e)

    cfg, hid, w, b, tgt, lb = _case("grpo")
    cols, T = COLS[cp_rank], tgt.shape[1]
    part = _columns(lb, cols, T)
    with_cp = upg_kernels.batch_totals(part.loss_mask, group=dp, cp_group=cp)
    without_cp = upg_kernels.batch_totals(part.loss_mask, group=dp)
    h, t = hid[:, cols], tgt[:, cols]
    catch("cp_group_missing", lambda: upg_kernels.unified_policy_loss(h, w, t, config=cfg, backend="torch",
                                                                       batch=part, totals=with_cp))
    catch("totals_without_cp", lambda: upg_kernels.unified_policy_loss(h, w, t, config=cfg, backend="torch",
                                                                        batch=part, totals=without_cp, cp_group=cp))
    # every CP rank must count the same rows (rank 1 passes one row fewer)
    catch("cp_rows_differ", lambda: upg_kernels.batch_totals(part.loss_mask[:6 - cp_rank], group=dp, cp_group=cp))
    catch("cp_paired", lambda: upg_kernels.batch_totals(part.loss_mask, paired=True, cp_group=cp))
    catch("group_not_a_group", lambda: upg_kernels.batch_totals(part.loss_mask, group="world"))
    return res


def _worker(rank, world):
    dp_rank, inner, dp, grp = _groups(rank)
    res = {}
    for name in ALL_PRESETS:
        res[f"cp-{name}"] = _dp_cp(name, dp_rank, inner, dp, grp)
    for name in DDP_OVER_DP:
        res[f"cp-dp-{name}"] = _dp_cp(name, dp_rank, inner, dp, grp, ddp_over="dp")
    res["errors"] = _errors(dp_rank, inner, dp, grp)
    for name in ALL_PRESETS:
        res[f"tp-{name}"] = _dp_tp(name, dp_rank, dp, grp)
    res["tp-dpo"] = _dpo_tp(dp_rank, dp, grp)
    return res


@pytest.fixture(scope="module")
def results():
    return run_world(_worker, 4)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_data_and_context_parallel_with_totals_equal_the_whole_batch(results, name):
    for rank, r in enumerate(results):
        d = r[f"cp-{name}"]
        assert d["counts"] == d["whole"], (rank, d)        # each row once, every CP rank's tokens
        assert max(d["loss"], d["dw"], d["db"], d["dh"]) < TOL, (rank, d)


@pytest.mark.parametrize("name", DDP_OVER_DP)
def test_ddp_over_the_data_parallel_group_with_cp_gradients_summed(results, name):
    for rank, r in enumerate(results):
        d = r[f"cp-dp-{name}"]
        assert max(d["loss"], d["dw"], d["db"], d["dh"]) < TOL, (rank, d)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_data_and_tensor_parallel_with_totals_equal_the_whole_batch(results, name):
    for rank, r in enumerate(results):
        d = r[f"tp-{name}"]
        assert d["world"] == 2 and d["shard"] == (10 if rank % 2 == 0 else 9), d    # uneven shards of V=19
        assert max(d["loss"], d["dw"], d["db"], d["dh"]) < TOL, (rank, d)


def test_dpo_with_tensor_parallel_and_totals(results):
    for r in results:
        d = r["tp-dpo"]
        assert d["pairs"] == 3 and max(d["loss"], d["dw"], d["db"], d["dh"]) < TOL, d


@pytest.mark.parametrize("key,match", [
    ("cp_group_missing", r"counted over a context-parallel group of 2 rank\(s\) but this call's cp_group has 1"),
    ("totals_without_cp", r"group of 1 rank\(s\) but this call's cp_group has 2: count them with "
                          r"batch_totals\(\.\.\., cp_group=cp_group\)"),
    ("cp_rows_differ", "the ranks of cp_group hold different numbers of main / demonstration rows"),
    ("cp_paired", "paired=True\\) does not take cp_group"),
    ("group_not_a_group", r"batch_totals\(group=...\) must be a torch.distributed.ProcessGroup or None, got str")])
def test_totals_and_groups_that_do_not_fit(results, key, match):
    import re
    for r in results:
        assert re.search(match, r["errors"][key]), r["errors"][key]


def test_cp_group_of_batch_totals_needs_a_process_group():
    import upg_kernels
    with pytest.raises(ValueError, match=r"batch_totals\(cp_group=...\) was given but torch.distributed is not "
                                         "initialized"):
        upg_kernels.batch_totals(torch.ones(2, 3), cp_group=object())
