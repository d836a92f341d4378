"""Independent float64 reference for :func:`upg_kernels.unified_policy_loss` (tests and documentation).

Written straight from the formulas of docs/losses.md, one part at a time, over materialized
``log_softmax`` logits and plain Python loops over sequences and tokens. It shares no code with
the fused epilogue (not even the group advantages). Slow by design: use small shapes.
"""
from __future__ import annotations

import math

import torch

from .config import LossConfig


def _groups_reference(rewards, group_size, group_ids):
    B = len(rewards)
    if group_ids is not None:
        labels = [int(g) for g in group_ids]
    else:
        labels = [i // group_size for i in range(B)]
    groups = {}
    for i, g in enumerate(labels):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def group_advantages_reference(rewards, *, group_size=None, group_ids=None, mode="mean_std", eps=1e-4):
    """Per-rollout advantages as plain Python floats (float64 math)."""
    r = [float(x) for x in rewards]
    out = [0.0] * len(r)
    groups = _groups_reference(r, group_size, group_ids)
    all_mean = sum(r) / len(r) if r else 0.0
    batch_std = math.sqrt(sum((x - all_mean) ** 2 for x in r) / (len(r) - 1)) if len(r) > 1 else 0.0
    for idx in groups:
        vals = [r[i] for i in idx]
        G = len(vals)
        if max(vals) == min(vals):
            continue  # exactly 0
        mean = sum(vals) / G
        for i in idx:
            c = r[i] - mean
            if mode == "mean":
                out[i] = c
            elif mode == "rloo":
                others = [r[j] for j in idx if j != i]
                out[i] = r[i] - sum(others) / (G - 1)
            elif mode == "mean_std":
                std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (G - 1))
                out[i] = c / (std + eps)
            else:
                out[i] = c / (batch_std + eps)
    return out


def _kl(d, kind):
    if kind == "k1":
        return d
    if kind == "k2":
        return d * d / 2
    return torch.exp(-d) + d - 1


def _vespo_phi_reference(log_w, a, cfg):
    """VESPO gamma weight for one sequence (python floats): phi(w) = e^lam * w^k * e^(-lam w)."""
    floor = math.log(1e-8)
    log_w = min(max(log_w, floor), 20.0)
    if a >= 0:
        k, lam = cfg.vespo_k_pos, cfg.vespo_lambda_pos
    else:
        k, lam = cfg.vespo_k_neg, cfg.vespo_lambda_neg
    lam = max(lam, 1e-4)
    try:
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
    except OverflowError:
        return 0.0
    return phi if math.isfinite(phi) else 0.0


def unified_policy_loss_reference(hidden, weight, targets, *, config, loss_mask=None, advantages=None,
                                  rewards=None, group_size=None, group_ids=None, old_logprobs=None,
                                  ref_logprobs=None, rollout_logprobs=None, is_demo=None, bias=None,
                                  temperature=1.0, num_items_in_batch=None, is_ratio=None,
                                  ignore_index=-100, softcap=None):
    """Returns ``(loss, metrics, logp [B,T], entropy [B,T], coef_logp [B,T])`` in float64.

    ``loss`` is differentiable w.r.t. the (float64) ``hidden``, ``weight`` and ``bias`` given.
    """
    cfg = config if isinstance(config, LossConfig) else LossConfig.preset(config)
    flat = hidden.dim() == 2
    if flat:
        hidden = hidden.unsqueeze(1)
        targets = targets.unsqueeze(1)

        def tok(x):
            return None if x is None else x.unsqueeze(1)
        loss_mask, old_logprobs, ref_logprobs, rollout_logprobs = map(
            tok, (loss_mask, old_logprobs, ref_logprobs, rollout_logprobs))
    B, T = targets.shape
    f64 = torch.float64
    z = hidden.to(f64) @ weight.to(f64).T
    if bias is not None:
        z = z + bias.to(f64)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logsm = torch.log_softmax(z, dim=-1)
    probs_all = logsm.exp()
    safe_t = torch.where(targets == ignore_index, torch.zeros_like(targets), targets)
    lp_all = logsm.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)           # [B, T]
    H_all = -(probs_all * logsm).sum(-1)                                   # [B, T]
    # leaves for the coefficients: the loss is built from these, chained back to the logits
    lp_leaf = lp_all.detach().clone().requires_grad_(True)
    H_leaf = H_all.detach().clone().requires_grad_(True)

    valid = [[bool(targets[i, t] != ignore_index) and (loss_mask is None or bool(loss_mask[i, t] != 0))
              for t in range(T)] for i in range(B)]
    demo = [bool(is_demo[i]) for i in range(B)] if is_demo is not None else [False] * B
    main_rows = [i for i in range(B) if not demo[i]]
    demo_rows = [i for i in range(B) if demo[i]]

    # ---- advantages A[i][t] (python floats)
    A = [[1.0] * T for _ in range(B)]
    per_row = True
    if cfg.advantage != "one":
        if advantages is not None:
            a = advantages.to(f64)
            if flat or a.dim() == 1:
                A = [[float(a[i])] * T for i in range(B)]
            elif a.shape[1] == 1:
                A = [[float(a[i, 0])] * T for i in range(B)]
            else:
                per_row = False
                A = [[float(a[i, t]) for t in range(T)] for i in range(B)]
        elif rewards is not None:
            rows_in = main_rows if cfg.demo_part == "sft" else list(range(B))
            rw = [float(rewards[i]) for i in rows_in]
            gid = None if group_ids is None else [int(group_ids[i]) for i in rows_in]
            adv = group_advantages_reference(rw, group_size=group_size, group_ids=gid,
                                             mode=cfg.advantage, eps=cfg.adv_eps)
            A = [[0.0] * T for _ in range(B)]
            for k, i in enumerate(rows_in):
                A[i] = [adv[k]] * T

    def val(x, i, t):
        return x[i, t].to(f64)

    # ---- main part
    main_terms = {}     # (i, t) -> per-token loss tensor
    ratios, lows, highs, duals, kls, isws, phis = {}, {}, {}, {}, {}, {}, {}

    def is_ratio_at(i, t):
        ir = is_ratio.to(f64)
        if ir.dim() == 1:
            return float(ir[i])
        return float(ir[i, 0]) if ir.shape[1] == 1 else float(ir[i, t])

    def rollout_weight(i, t, toks, olds):
        if cfg.rollout_is.startswith("sequence"):
            logw = sum(float(olds[s].detach()) - float(val(rollout_logprobs, i, s)) for s in toks)
        else:
            logw = float(olds[t].detach()) - float(val(rollout_logprobs, i, t))
        w = math.exp(min(logw, 700.0))
        if cfg.rollout_is.endswith("truncate"):
            return min(w, cfg.rollout_is_cap)
        return 0.0 if logw > math.log(cfg.rollout_is_cap) else w
    for i in main_rows:
        toks = [t for t in range(T) if valid[i][t]]
        if not toks:
            continue
        lps = {t: lp_leaf[i, t] for t in toks}
        olds = {t: (val(old_logprobs, i, t) if old_logprobs is not None else lps[t].detach()) for t in toks}
        refs = {t: (val(ref_logprobs, i, t) if ref_logprobs is not None else lps[t].detach()) for t in toks}
        if cfg.reference == "old" and cfg.ratio_level == "sequence":
            s = torch.exp(sum(lps[t] - olds[t] for t in toks) / len(toks))
            rs = {t: s for t in toks}
        elif cfg.reference == "old":
            rs = {t: torch.exp(lps[t] - olds[t]) for t in toks}
        vespo_logw = None
        if cfg.stabilization == "vespo":
            # log of the sequence ratio prod_t pi/pi_old (token log-ratios clamped to [-20, 20]) times the
            # sampler corrections, which VESPO folds in (each log clamped to [log 1e-8, 20])
            floor = math.log(1e-8)

            def clog(x):
                return min(max(math.log(x), floor), 20.0) if x > 0 else floor
            vespo_logw = sum(min(max(float(lps[t].detach()) - float(olds[t]), -20.0), 20.0) for t in toks)
            if is_ratio is not None:
                if is_ratio.dim() == 1 or is_ratio.shape[1] == 1 or flat:
                    vespo_logw += clog(is_ratio_at(i, toks[0]))
                else:
                    vespo_logw += sum(clog(is_ratio_at(i, t)) for t in toks)
            if cfg.rollout_is is not None:
                vespo_logw += sum(clog(rollout_weight(i, t, toks, olds)) for t in toks)
        for t in toks:
            a = A[i][t]
            lp = lps[t]
            p = torch.exp(lp)
            if cfg.reference == "old":
                r = rs[t]
                rv = float(r.detach())
                ratios[(i, t)] = rv
                lows[(i, t)] = duals[(i, t)] = highs[(i, t)] = 0.0
                if cfg.stabilization == "none":
                    l = -r * a
                elif cfg.stabilization in ("clip", "seq_clip"):
                    unclipped = r if cfg.delta is None else torch.clamp(r, max=cfg.delta)
                    clipped = torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high)
                    l = torch.max(-unclipped * a, -clipped * a)
                    lows[(i, t)] = float(rv < 1 - cfg.eps_low and a < 0)
                    highs[(i, t)] = float(rv > 1 + cfg.eps_high and a > 0)
                    if cfg.dual_clip is not None and a < 0:
                        if float(l.detach()) > -cfg.dual_clip * a:
                            duals[(i, t)] = 1.0
                            l = l.detach() * 0 + (-cfg.dual_clip * a)
                elif cfg.stabilization == "cispo":
                    l = -min(rv, cfg.eps_high) * a * lp
                    highs[(i, t)] = float(rv > cfg.eps_high and a > 0)
                elif cfg.stabilization == "vespo":
                    phi = _vespo_phi_reference(vespo_logw, a, cfg)
                    phis[(i, t)] = phi
                    l = -phi * a * lp
                else:
                    tau = cfg.tau_pos if a > 0 else cfg.tau_neg
                    l = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
            elif cfg.reference == "current":
                if cfg.likelihood == "logp":
                    obj = lp
                elif cfg.likelihood == "dft":
                    obj = float(p.detach()) * lp
                elif cfg.likelihood == "chi2":
                    u = cfg.fdiv_beta * (lp - refs[t])
                    obj = lp - p * u ** 2 / (4 * cfg.fdiv_beta)
                else:
                    u = cfg.fdiv_beta * (lp - refs[t])
                    if float(u.detach()) > 0.5:
                        u = u.detach() * 0 + 0.5
                    obj = lp - p * u ** 2 / ((1 - u) * cfg.fdiv_beta)
                l = -a * obj
            elif cfg.reference == "one":
                l = -a * p
            else:
                l = -a * p / (p + cfg.shaping_gamma)
            if cfg.rollout_is is not None:
                w = rollout_weight(i, t, toks, olds)
                isws[(i, t)] = w
                if cfg.stabilization != "vespo":
                    l = l * w
            if is_ratio is not None and cfg.stabilization != "vespo":
                l = l * is_ratio_at(i, t)
            k = _kl(lp - refs[t], cfg.kl_type)
            if cfg.kl_bias_correction:
                k = k * rs[t]          # the ratio itself (unclamped, with its gradient)
            kls[(i, t)] = float(k.detach())
            if cfg.kl_coef > 0:
                l = l + cfg.kl_coef * k
            if cfg.entropy_coef > 0:
                l = l - cfg.entropy_coef * H_leaf[i, t]
            main_terms[(i, t)] = l

    # ---- demo part
    demo_terms = {}
    for i in demo_rows:
        for t in range(T):
            if not valid[i][t]:
                continue
            lp = lp_leaf[i, t]
            if cfg.demo_part == "sft":
                demo_terms[(i, t)] = -lp
            else:
                p = torch.exp(lp)
                demo_terms[(i, t)] = -A[i][t] * p / (p + cfg.shaping_gamma)

    def aggregate(terms, rows, mode, n_items):
        zero = torch.zeros((), dtype=f64)
        nb = max(len(rows), 1)
        if mode == "token_mean":
            denom = max(float(n_items), 1.0) if n_items is not None else max(len(terms), 1)
            return sum(terms.values(), zero) / denom
        if mode == "seq_mean_token_mean":
            tot = zero
            for i in rows:
                ts = [v for (ii, _), v in terms.items() if ii == i]
                if ts:
                    tot = tot + sum(ts, zero) / len(ts)
            return tot / nb
        if mode == "seq_mean_token_sum":
            return sum(terms.values(), zero) / nb
        return sum(terms.values(), zero) / (nb * cfg.max_completion_length)

    L_main = aggregate(main_terms, main_rows, cfg.aggregation, num_items_in_batch)
    demo_mode = cfg.demo_aggregation if cfg.demo_part == "sft" else cfg.aggregation
    L_demo = aggregate(demo_terms, demo_rows, demo_mode, None) if cfg.demo_part else torch.zeros((), dtype=f64)
    total_leaf = cfg.rl_coef * L_main + cfg.demo_coef * L_demo
    g_lp, g_H = torch.autograd.grad(total_leaf, [lp_leaf, H_leaf], retain_graph=False, allow_unused=True)
    g_lp = torch.zeros_like(lp_all) if g_lp is None else g_lp
    g_H = torch.zeros_like(lp_all) if g_H is None else g_H
    # chain the coefficients to the logits: same value, gradient to hidden/weight/bias
    loss = total_leaf.detach() + (g_lp * (lp_all - lp_all.detach())).sum() \
        + (g_H * (H_all - H_all.detach())).sum()

    # ---- metrics
    def mean(d):
        return sum(d.values()) / len(d) if d else 0.0
    n_valid = sum(v for row in valid for v in row)
    keys = [(i, t) for i in main_rows for t in range(T) if valid[i][t]]
    m = {"loss_main": float(L_main.detach()), "loss_demo": float(L_demo.detach())}
    if cfg.reference == "old" and keys:
        rv = [ratios[k] for k in keys]
        m.update(ratio_mean=sum(rv) / len(rv), ratio_min=min(rv), ratio_max=max(rv))
    else:
        m.update(ratio_mean=1.0, ratio_min=1.0, ratio_max=1.0)
    m["clip_frac_low"] = mean(lows)
    m["clip_frac_high"] = mean(highs)
    m["clip_frac"] = m["clip_frac_low"] + m["clip_frac_high"]
    m["dual_clip_frac"] = mean(duals)
    m["kl_mean"] = mean(kls) if ref_logprobs is not None else 0.0
    m["entropy_mean"] = (sum(float(H_all[i, t].detach()) for i in range(B) for t in range(T) if valid[i][t])
                         / max(n_valid, 1))
    if per_row:
        av = [A[i][0] for i in main_rows if any(valid[i])]
    else:
        av = [A[i][t] for (i, t) in keys]
    am = sum(av) / len(av) if av else 0.0
    m["adv_mean"] = am
    m["adv_std"] = math.sqrt(sum((x - am) ** 2 for x in av) / len(av)) if av else 0.0
    zc = sum(1 for i in range(B) for t in range(T)
             if valid[i][t] and float(g_lp[i, t]) == 0.0 and float(g_H[i, t]) == 0.0)
    m["zero_coef_frac"] = zc / max(n_valid, 1)
    m["rollout_tokens"] = float(len(keys))
    m["demo_tokens"] = float(sum(1 for i in demo_rows for t in range(T) if valid[i][t]))
    m["rollout_rows"] = float(len(main_rows))
    m["demo_rows"] = float(len(demo_rows))
    m["sft_share"] = len(demo_rows) / max(B, 1)
    if cfg.stabilization == "vespo":
        m["vespo_phi_mean"] = mean(phis)
    if cfg.rollout_is is not None:
        m["rollout_is_mean"] = mean(isws)
        m["rollout_is_zero_frac"] = mean({k: float(v == 0.0) for k, v in isws.items()})
    valid_t = torch.tensor(valid)
    lp_out = torch.where(valid_t | (targets != ignore_index), lp_all, torch.zeros_like(lp_all)).detach()
    H_out = torch.where(targets != ignore_index, H_all, torch.zeros_like(H_all)).detach()
    if flat:
        lp_out, H_out, g_lp = lp_out.squeeze(1), H_out.squeeze(1), g_lp.squeeze(1)
    return loss, m, lp_out, H_out, -g_lp
