"""The training loop of every ``upg-train`` method, all through ``upg_kernels`` losses.

``Trainer`` builds what every method shares (the model, the data, the rewards, the loss config, the
reference model, the rollout engine, the optimizer and the checkpoints) and runs one loop (``train``);
a method (``methods/``, one class each: sft, grpo, hpt, rm, dpo, ppo) runs a step: it builds its
micro-batches and calls the shared accumulation/update ``update`` with its loss.

The model is never asked for logits: the decoder gives hidden states, and the loss takes them with
the lm_head weight (``model.hidden_states`` + ``distributed.output_weight``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time

import torch
import yaml

from upg_kernels.losses import LossConfig, batch_totals, unified_policy_loss

from . import distributed as dist
from .checkpoint import (MetricsLog, clean_partial, list_checkpoints, load_checkpoint, read_metrics,
                         save_checkpoint, set_rng_state)
from .config import Config
from .data import RowBatch, build_rows, check_columns, encode_prompt, load_rows, prompt_text
from .methods import get_method
from .model import (check_fused_logprobs, freeze, get_head, hidden_states, load_model_and_tokenizer,
                    load_reference_model)
from .rewards import RewardSet
from .rollout import make_engine
from .rollout.base import logprob_mismatch
from .schedule import make_scheduler

TIME_KEYS = ("time", "step_time", "tokens_per_s", "rollout_time", "elapsed")


def make_loss_config(cfg: Config) -> LossConfig:
    """The LossConfig of the run: the preset (``loss.preset`` or the method's) + ``loss.overrides``,
    checked by the method (``Method.check_loss``)."""
    method = get_method(cfg.command)
    name = cfg.loss_preset()
    ov = dict(cfg.loss.overrides or {})
    if "hpt_gamma" in ov:
        raise ValueError("loss.overrides hpt_gamma is not used by upg-train: the HPT gate reads --hpt.gamma; "
                         f"pass --hpt.gamma {ov['hpt_gamma']} instead")
    base = LossConfig.preset(name, **ov)
    if "max_completion_length" not in ov and "seq_mean_token_sum_norm" in (base.aggregation, base.demo_aggregation):
        base = base.replace(max_completion_length=method.completion_limit(cfg))
    method.check_loss(base, name)
    return base


def _fingerprint(model) -> dict:
    """Per-tensor (sum, sum of squares) in float64: identifies the reference weights across a resume."""
    out = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                flat = v.detach().reshape(-1)
                s = q = 0.0
                for i in range(0, flat.numel(), 1 << 24):  # chunks: no float64 copy of a whole embedding
                    x = flat[i:i + (1 << 24)].double()
                    s += float(x.sum())
                    q += float((x * x).sum())
                out[k] = [s, q]
    return out


def _same_fingerprint(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for k in a for x, y in zip(a[k], b[k]))


def check_device(device: str) -> None:
    """``model.device`` names a device this torch can use, or a clear error."""
    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"model.device {device!r} is not a device name (auto | cpu | cuda | cuda:N): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver)")
            raise ValueError(f"model.device {device!r}: {why} (torch {torch.__version__}); use --model.device "
                             "cpu (or auto), or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"model.device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")


class Trainer:
    """The shared state and the one loop (``train``) of every method; ``self.method`` runs the steps."""

    def __init__(self, cfg: Config, model=None, tokenizer=None):
        self.cfg = cfg
        self.method = method = get_method(cfg.command)(self)
        dist.init_distributed()
        torch.manual_seed(cfg.train.seed)
        self._check_processes()
        if model is None:
            model, tokenizer, self.device = method.load_model() or self._load_model()
        else:
            self.device = next(model.parameters()).device
        # final-logit softcapping (Gemma-2 style) goes to every log-prob / loss call; a logit scale is
        # refused by get_head; the fused log-probs are checked once against the model's own logits
        self.softcap = None
        if method.logprobs:
            self.softcap = get_head(model).softcap
            check_fused_logprobs(model, self.softcap, backend=cfg.loss.backend)
        self.lm, self.tok = model, tokenizer
        self.out = cfg.output.dir
        self.metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), enabled=dist.is_main())
        self.step = 0
        self._prompt_cache: dict = {}
        self._load_data()
        self.loss_cfg = make_loss_config(cfg) if method.loss_preset else None
        # the reference model (KL / chi2 / hellinger / DPO / PPO's KL-in-reward): built from the initial
        # weights, before a resume loads the checkpoint's weights into the policy, so a resumed run gets
        # the same reference
        self.ref, self.ref_softcap = None, None
        if method.needs_reference():
            self.ref = self._build_reference()
        method.setup()
        self.resume_state = None
        if method.trains:
            self._prepare_output()  # resume: weights go into the plain model before it is wrapped
        if self.ref is not None:
            self._check_reference()
        self._wrap()
        self.opt, self.sched = self._optimizer()
        if self.resume_state is not None:
            self._restore(*self.resume_state)

    # ------------------------------------------------------------------------------- setup
    def _check_processes(self):
        """How the run was launched against what its config asks: one clear error, before any loading."""
        cfg, m, ws = self.cfg, self.method, dist.world_size()
        check_device(cfg.model.device)
        if cfg.train.strategy != "none" and not (torch.distributed.is_available()
                                                  and torch.distributed.is_initialized()):
            raise ValueError(f"train.strategy {cfg.train.strategy} runs one process per GPU (or per CPU "
                             f"process group) under torchrun: launch `torchrun --nproc-per-node N -m "
                             f"upg_trainer.cli {cfg.command} ... --train.strategy {cfg.train.strategy}` (N = the "
                             "number of processes), or use --train.strategy none for one process")
        if m.single_process and ws > 1:
            raise ValueError(f"`upg-train {m.name}` runs in one process for now (world size {ws}); run it "
                             "without torchrun")
        if m.single_process and cfg.train.strategy != "none":
            raise ValueError(f"`upg-train {m.name}` supports train.strategy none only")
        if m.trains and cfg.train.batch_size < ws:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is smaller than the world size {ws}: every "
                             f"rank needs at least one of the step's {m.batch_unit}; use --train.batch_size >= {ws}")
        if m.rollouts and ws > 1 and cfg.rollout.engine == "hf" and cfg.train.batch_size % ws:
            # the hf engine generates in lock-step across ranks (FSDP2 gathers per forward): equal prompt
            # counts per rank keep the number of generate calls equal, so no rank waits forever
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the world size "
                             f"{ws} with rollout.engine=hf (equal prompts per rank)")

    def _load_model(self):
        m = self.cfg.model
        return load_model_and_tokenizer(m.path, dtype=m.dtype, device=m.device,
                                        attn_implementation=m.attn_implementation, seed=self.cfg.train.seed,
                                        trust_remote_code=m.trust_remote_code)

    def _load_data(self):
        """The method's training rows, the held-out rows of greedy evaluation, the reward functions."""
        cfg, d, method = self.cfg, self.cfg.data, self.method
        self.train_rows: list = []
        self.sampler = None
        method.load_data()
        self.eval_rows = []
        eval_path = method.eval_path()
        if eval_path:
            self.eval_rows = load_rows(eval_path, split=d.eval_split, num=d.num_eval, seed=cfg.train.seed,
                                       levels=d.eval_levels, eval_set=True)
            check_columns(self.eval_rows, [d.prompt_column, d.answer_column], eval_path, "evaluation")
        needs_reward = method.needs_reward or bool(self.eval_rows)
        self.rewards = RewardSet(cfg.reward.funcs, cfg.reward.weights) if needs_reward else None
        self.eval_rewards = self.rewards
        if cfg.reward.eval_funcs and self.eval_rows:  # e.g. ppo trained on rm:PATH, evaluated by the verifier
            self.eval_rewards = RewardSet(cfg.reward.eval_funcs)

    def _wrap(self):
        """The policy (and an FSDP2 reference) wrapped for the strategy, and the rollout engine."""
        cfg = self.cfg
        bf16 = cfg.train.mixed_precision == "bf16"
        self.model = dist.wrap_model(self.lm, cfg.train.strategy,
                                     param_dtype=torch.bfloat16 if bf16 else None,
                                     reduce_dtype=torch.float32 if bf16 else None,
                                     activation_checkpointing=cfg.train.activation_checkpointing)
        if self.ref is not None and cfg.train.strategy == "fsdp2":
            # sharded like the policy (same units, same mixed precision), used inside forward_call only;
            # under ddp every rank keeps a plain frozen replica (DDP wraps only trainable modules)
            self.ref = dist.wrap_model(self.ref, "fsdp2", param_dtype=torch.bfloat16 if bf16 else None,
                                       reduce_dtype=torch.float32 if bf16 else None)
        r = cfg.rollout
        self.engine = None
        if self.method.generates:
            self.engine = make_engine(r.engine, self.model, self.tok, batch_size=r.batch_size,
                                      gpu_memory_utilization=r.gpu_memory_utilization,
                                      max_model_len=r.max_model_len or cfg.data.max_prompt_tokens + r.max_new_tokens,
                                      sleep_level=r.sleep_level, seed=cfg.train.seed,
                                      dtype="bfloat16" if bf16 else None,
                                      return_logprobs=getattr(self.loss_cfg, "rollout_is", None) is not None)

    def _optimizer(self):
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        return opt, make_scheduler(opt, t.schedule, t.max_steps * t.mini_batches, t.warmup_steps, t.min_lr_ratio)

    def _restore(self, opt_state, st):
        dist.load_full_optimizer_state_dict(self.model, self.opt, opt_state)
        self.sched.load_state_dict(st["scheduler"])
        self.sampler.pos = st["data_pos"]
        self.method.load_state_dict(st.get("method", {}))
        self.step = st["step"]
        set_rng_state(st["rng"])

    def _build_reference(self):
        """A frozen copy of the initial policy, or the model at ``model.ref_path``."""
        m = self.cfg.model
        try:
            if m.ref_path:
                ref = load_reference_model(m.ref_path, dtype=m.dtype, device=m.device,
                                           attn_implementation=m.attn_implementation, seed=self.cfg.train.seed,
                                           trust_remote_code=m.trust_remote_code)
                ref.to(self.device)
            else:
                ref = freeze(copy.deepcopy(self.lm))
        except Exception as e:
            src = f"model.ref_path={m.ref_path!r}" if m.ref_path else "a copy of the initial policy"
            lc = self.loss_cfg
            why = (f"loss kl_coef={lc.kl_coef} / likelihood={lc.likelihood!r}"
                   if lc is not None and (lc.kl_coef > 0 or lc.likelihood in ("chi2", "hellinger"))
                   else f"`upg-train {self.method.name}`")
            raise RuntimeError(f"could not build the reference model ({src}) that {why} needs: "
                               f"{type(e).__name__}: {e}") from e
        w_ref, w_pol = get_head(ref).weight, get_head(self.lm).weight
        if w_ref.shape[0] != w_pol.shape[0]:
            raise ValueError(f"the reference model {m.ref_path!r} has a vocabulary of {w_ref.shape[0]} tokens, "
                             f"the policy {w_pol.shape[0]}: a KL needs the same vocabulary")
        self.ref_softcap = get_head(ref).softcap
        if m.ref_path:
            check_fused_logprobs(ref, self.ref_softcap, backend=self.cfg.loss.backend)
        return ref

    def _check_reference(self):
        """``<output.dir>/reference.json`` records the reference weights' fingerprint when a run starts;
        a resumed run rebuilds the reference the same way and must find the same weights."""
        path = os.path.join(self.out, "reference.json")
        src = self.cfg.model.ref_path or f"initial policy ({self.cfg.model.path})"
        fp = _fingerprint(self.ref)
        if self.resume_state is not None and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if not _same_fingerprint(saved["fingerprint"], fp):
                raise ValueError(f"the reference model rebuilt from {src} differs from the one this run "
                                 f"started with ({saved.get('source')}, recorded in {path}): its weights "
                                 "changed since; restore them or start a new run")
            return
        if dist.is_main():
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"source": src, "fingerprint": fp}, f)
            os.replace(tmp, path)

    def _prepare_output(self):
        """A new run in ``output.dir`` (refusing to replace a run without ``output.overwrite``), or with
        ``output.resume`` the latest checkpoint's weights and state (``_resume``)."""
        cfg, out = self.cfg, self.out
        if cfg.output.resume and not os.path.isdir(out) and not cfg.output.overwrite:
            raise FileNotFoundError(f"--resume: output.dir {out!r} does not exist, so there is no run to resume; "
                                    "check --output.dir (or the config file's output.dir), or drop --resume to "
                                    "start a new run")
        os.makedirs(out, exist_ok=True)
        if dist.is_main():
            clean_partial(out)
        ckpts = list_checkpoints(out)
        if cfg.output.resume and ckpts:
            self._resume(*ckpts[-1])
            return
        # a run = a checkpoint or a logged training step; a start that failed before its first step (only
        # config.yaml, an empty metrics.jsonl or a step-0 eval row) is not one and is started over
        steps = [r["step"] for r in read_metrics(self.metrics.path) if r.get("kind") == "train"]
        if cfg.output.resume and not cfg.output.overwrite:
            held = (f"its metrics.jsonl logs {len(steps)} training steps but no checkpoint was saved (output."
                    f"save_every={cfg.output.save_every})" if steps else "it holds no checkpoint")
            raise FileNotFoundError(f"--resume: nothing to resume in output.dir {out!r}: {held}. Check "
                                    "--output.dir; pass --output.overwrite true as well to start the run over "
                                    "(this deletes its metrics.jsonl), or drop --resume")
        if (ckpts or steps) and not (cfg.output.resume or cfg.output.overwrite):
            raise FileExistsError(f"output.dir {out!r} already holds a run; pass --output.resume true to "
                                  "continue it or --output.overwrite true to start over")
        dist.barrier()  # every rank checks before rank 0 writes (else rank 1 sees rank 0's fresh files)
        if dist.is_main():
            for _, p in ckpts:
                shutil.rmtree(p, ignore_errors=True)
            if os.path.exists(os.path.join(out, "reference.json")):
                os.remove(os.path.join(out, "reference.json"))  # a new run records its own reference
            self.metrics.truncate_after(None)
            with open(os.path.join(out, "config.yaml"), "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    def _resume(self, step: int, path: str):
        """Check that this invocation continues the recorded run (method, settings: ``resume.py``), then
        load the checkpoint's weights; the optimizer, scheduler and method state follow in ``_restore``."""
        from .resume import IGNORED, compare_settings, describe, resumed_config
        cfg, out = self.cfg, self.out
        cfg_file = os.path.join(out, "config.yaml")
        saved = {}
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                saved = yaml.safe_load(f) or {}
        sd, opt_state, st = load_checkpoint(path)
        was = st.get("command") or saved.get("command")
        if was and was != cfg.command:
            raise ValueError(f"--resume: output.dir {out!r} holds a `upg-train {was}` run; `upg-train {cfg.command}` "
                             f"cannot continue it. Run `upg-train {was} --resume`, or start the new method in "
                             f"another --output.dir (from this run's weights: --model.path {path}/model)")
        applied, ignored = compare_settings(saved, cfg.to_dict()) if saved else ({}, {})
        self.method.load_weights(sd, path)
        self.resume_state = (opt_state, st)
        self.metrics.truncate_after(step)  # drop rows of steps after the checkpoint (they are redone)
        if dist.is_main():
            print(f"[upg-train] resuming from {path} (step {step})")
            if not saved:
                print(f"[upg-train] warning: {cfg_file} is missing: the settings were not compared with the "
                      "original run's")
            if applied:
                print(f"[upg-train] resume: changed settings applied from step {step + 1} on: {describe(applied)}")
                with open(cfg_file, "w") as f:
                    yaml.safe_dump(resumed_config(cfg.to_dict(), ignored), f, sort_keys=False)
            if ignored:
                print("[upg-train] warning: --resume ignores these changed settings (the checkpoint's values "
                      f"are used): {describe(ignored, IGNORED)}. Start a new run to change them")

    def prompt_ids(self, row) -> list[int]:
        """A row's prompt tokens (chat template, system prompt), its last data.max_prompt_tokens kept."""
        key = id(row)
        if key not in self._prompt_cache:
            ids = encode_prompt(self.tok, row[self.cfg.data.prompt_column], self.cfg.data.system_prompt)
            limit = self.cfg.data.max_prompt_tokens
            if limit and len(ids) > limit:
                if not getattr(self, "_warned_long", False):
                    print(f"[upg-train] warning: a prompt has {len(ids)} tokens > data.max_prompt_tokens="
                          f"{limit}; keeping its last {limit} tokens (warned once)")
                    self._warned_long = True
                ids = ids[-limit:]
            self._prompt_cache[key] = ids
        return self._prompt_cache[key]

    # ------------------------------------------------------------------------------- loss
    def temperature(self) -> float:
        """The temperature of the loss (and of the old / reference log-probs): the sampler's for a method
        that trains on its rollouts, else 1."""
        return self.cfg.rollout.temperature if self.method.rollouts else 1.0

    def policy_loss_of(self, micro: list[tuple[RowBatch, dict]], extra_term=None, extra_keys=()):
        """``loss_of`` for ``unified_policy_loss``: every micro-batch's loss divides by the totals of the whole
        batch (``batch_totals`` over every micro-batch of every rank, once per optimizer step), times the
        world size that DDP/FSDP gradient averaging divides by, so the micro-batch losses add up to the
        batch loss. Padding micro-batches (``RowBatch.padding``) count nowhere and add exactly 0.
        ``extra_term(k, mb, extra, hidden) -> loss`` adds a term on the same hidden states in the same
        forward (PPO's shared value head); ``extra_keys``: the entries of ``extra`` that are its inputs,
        not the policy loss's."""
        lc = self.loss_cfg
        real = [(mb, extra) for mb, extra in micro if not mb.padding]
        totals = batch_totals([(mb.loss_mask != 0) & (mb.targets != -100) for mb, _ in real],
                              is_demo=[extra.get("is_demo") for _, extra in real],
                              group=torch.distributed.group.WORLD if dist.is_distributed() else None)
        ws = totals.world_size
        n_all = totals.main_tokens + totals.demo_tokens
        rl_share = demo_share = 1.0
        if lc.demo_part == "shaped" and lc.aggregation == "token_mean" and n_all > 0:
            # LUFFY's objective is one token mean over on- and off-policy tokens together; the loss
            # normalises each part over its own tokens, so weight the parts by their token shares
            # (docs/losses.md, "Mixed batches")
            rl_share, demo_share = totals.main_tokens / n_all, totals.demo_tokens / n_all
        cfg_ws = lc if (ws == 1 and rl_share == 1.0 and demo_share == 1.0) else lc.replace(
            rl_coef=lc.rl_coef * rl_share * ws,
            **({"demo_coef": lc.demo_coef * demo_share * ws} if lc.demo_part is not None else {}))

        def loss_of(k, mb, extra):
            kw = {key: v for key, v in extra.items() if key not in extra_keys}
            if not mb.padding:
                kw["totals"] = totals
            box: list = []

            def fn(lm):
                h = hidden_states(lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
                w, b = dist.output_weight(lm)
                out = unified_policy_loss(h, w, mb.targets, config=cfg_ws, loss_mask=mb.loss_mask, bias=b,
                                          temperature=self.temperature(), softcap=self.softcap,
                                          backend=self.cfg.loss.backend, **kw)
                if "rollout_logprobs" in kw:  # the sampler's log-probs: how far they are from the trainer's
                    out.metrics.update(logprob_mismatch(out.logprobs, kw["rollout_logprobs"], mb.loss_mask,
                                                        kw.get("is_demo")))
                box.append(out)
                return out.loss if extra_term is None else out.loss + extra_term(k, mb, extra, h)
            loss = dist.forward_call(self.model, fn)
            # metric weight: the micro-batch's tokens (0 for a padding micro-batch); its loss parts are its
            # shares of the batch's, so they enter the token-weighted mean scaled to add up
            n = float(((mb.loss_mask != 0) & (mb.targets != -100)).sum())
            metrics = dict(box[0].metrics)
            for key in ("loss_main", "loss_demo"):
                if n and key in metrics:
                    metrics[key] *= n_all / n
            return loss, metrics, n
        return loss_of

    def update(self, micro: list[tuple[RowBatch, dict]], loss_of=None, *, model=None, opt=None,
                sched=None) -> dict:
        """One optimizer update over micro-batches: the one accumulation loop of every step.

        ``loss_of(k, mb, extra) -> (loss, metrics, weight)`` gives micro-batch ``k``'s share of the batch
        loss (the shares add up to the batch loss), its metrics and their weight in the logged mean;
        default: the unified policy loss (``policy_loss_of``). ``model``/``opt``/``sched`` default to the
        policy's (PPO's separate critic passes its own)."""
        model = self.model if model is None else model
        opt = self.opt if opt is None else opt
        sched = self.sched if sched is None and model is self.model else sched
        loss_of = self.policy_loss_of(micro) if loss_of is None else loss_of
        ws = dist.world_size()
        agg = {}
        loss_total = 0.0
        opt.zero_grad(set_to_none=True)
        for k, (mb, extra) in enumerate(micro):
            with dist.no_sync(model, enabled=k < len(micro) - 1):
                loss, metrics, w = loss_of(k, mb.to(self.device),
                                           {key: v.to(self.device) for key, v in extra.items()})
                loss.backward()
            loss_total += loss.item() / ws
            for name, v in metrics.items():  # w = 0 (padding): its keys still join the all-reduce below
                a = agg.setdefault(name, [0.0, 0.0])
                a[0] += float(v) * w if w else 0.0
                a[1] += w
        params = [p for g in opt.param_groups for p in g["params"]]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0
                                            else math.inf)
        lr = opt.param_groups[0]["lr"]  # the LR this update trains with (sched.step() moves to the next)
        opt.step()
        if sched is not None:
            sched.step()
        if model is self.model and self.engine is not None:
            self.engine.sync_weights(self.model)
        if dist.is_distributed():
            # token-weighted over every rank's micro-batches, so kl_mean, entropy, ... describe the whole
            # batch; the union of the ranks' keys (a rank may hold only demonstrations or only RL rows)
            names = sorted(set().union(*dist.all_gather_object(sorted(agg))))
            for k in names:
                agg.setdefault(k, [0.0, 0.0])
            t = dist.all_reduce_sum(torch.tensor([agg[k] for k in names], dtype=torch.float64))
            agg = {k: t[i].tolist() for i, k in enumerate(names)}
        out = {k: a[0] / a[1] for k, a in agg.items() if a[1] > 0}
        out.update(loss=dist.all_reduce_sum(loss_total), grad_norm=float(gn), lr=lr)
        return out

    @staticmethod
    def split(items: list, k: int) -> list[list]:
        """Exactly ``k`` contiguous chunks (sizes differ by at most one; some are empty when
        ``len(items) < k``). Every rank gets ``k`` chunks whatever its item count, so every rank runs the
        same number of mini-batches, micro-batches, forwards and collectives (an empty chunk becomes a
        padding row, see ``pad_batch``)."""
        n = len(items)
        return [items[i * n // k:(i + 1) * n // k] for i in range(k)]

    def pad_batch(self) -> RowBatch:
        """One row with an all-zero loss mask: run for an empty chunk so the rank still joins every FSDP2
        all-gather / DDP all-reduce of the micro-batch; it adds exactly 0 to the loss and the gradient."""
        return dataclasses.replace(build_rows([[self.tok.pad_token_id]], [[]], self.tok.pad_token_id),
                                   padding=True)

    def columns_of(self, rows: list[dict]) -> dict:
        """The non-prompt columns for reward functions (TRL passes them as keyword arguments)."""
        c = self.cfg.data
        cols = {k: [r.get(k) for r in rows] for k in rows[0] if k != c.prompt_column}
        if c.answer_column != "answer" and c.answer_column in cols:
            cols.setdefault("answer", cols[c.answer_column])
        return cols

    @torch.no_grad()
    def fill_logprobs(self, micro, key: str, model, softcap):
        """``extra[key]`` = ``model``'s log-probs of each micro-batch's targets at the loss's temperature:
        ``old_logprobs`` (the policy before the batch's first update, PPO's pi_old, mini_batches > 1) or
        ``ref_logprobs`` (the frozen reference). Computed in eval mode (no dropout), then the model's
        train/eval mode is restored. Padding micro-batches are run too (same forwards on every rank)."""
        from upg_kernels import token_logprobs
        was_training = model.training
        model.eval()
        try:
            for mb, extra in micro:
                mbd = mb.to(self.device)

                def fn(lm):
                    h = hidden_states(lm, mbd.input_ids, mbd.attention_mask, mbd.position_ids)[:, mbd.start:]
                    w, b = dist.output_weight(lm)
                    return token_logprobs(h, w, mbd.targets, bias=b, temperature=self.temperature(),
                                          backend=self.cfg.loss.backend, softcap=softcap)
                extra[key] = dist.forward_call(model, fn).cpu()
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy accuracy on the held-out rows (and per level when the rows have a 'level' column), and
        the method's own held-out metrics (``Method.evaluate``)."""
        c = self.cfg
        own = self.method.evaluate()
        if not self.eval_rows:
            return own
        rows = self.eval_rows
        prompts = [self.prompt_ids(r) for r in rows]
        self.engine.wake()
        ro = self.engine.generate(prompts, n=1, max_new_tokens=c.rollout.max_new_tokens, temperature=0.0, seed=0)
        self.engine.sleep()
        texts = self.tok.batch_decode([r.completion_ids for r in ro], skip_special_tokens=True)
        cols = self.columns_of(rows)
        reward, _ = self.eval_rewards([prompt_text(r[c.data.prompt_column]) for r in rows], texts, cols)
        ok = [float(x >= c.reward.correct_threshold) for x in reward]
        m = {"eval/accuracy": sum(ok) / len(ok), "eval/reward": sum(reward) / len(reward)}
        if "level" in rows[0]:
            for lv in sorted({r["level"] for r in rows}):
                sel = [o for o, r in zip(ok, rows) if r["level"] == lv]
                m[f"eval/acc_level{lv}"] = sum(sel) / len(sel)
        self.last_eval_samples = list(zip([prompt_text(r[c.data.prompt_column]) for r in rows[:3]], texts[:3]))
        return dict(m, **own)

    # ------------------------------------------------------------------------------- checkpoints
    def save(self):
        sd = dist.full_state_dict(self.model)
        opt = dist.full_optimizer_state_dict(self.model, self.opt)
        if dist.is_main():
            st = {"scheduler": self.sched.state_dict(), "data_pos": self.sampler.pos, "command": self.cfg.command,
                  "method": self.method.state_dict()}
            save_checkpoint(self.out, self.step, model_state=sd, save_model_fn=lambda p: self.method.save_model(p, sd),
                            optimizer_state=opt, trainer_state=st, keep_last=self.cfg.output.keep_last)
        dist.barrier()

    def save_final(self, path: str):
        sd = dist.full_state_dict(self.model)
        if dist.is_main():
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.method.save_model(tmp, sd, final=True)
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
        dist.barrier()

    # ------------------------------------------------------------------------------- loop
    def _has_eval(self) -> bool:
        return bool(self.eval_rows) or self.method.has_eval()

    def train_step(self) -> dict:
        """One step of the method (its metrics); ``train`` logs it."""
        return self.method.step()

    def train(self) -> dict:
        from tqdm.auto import tqdm

        c = self.cfg
        t = c.train
        if self.step == 0 and self._has_eval():
            self.metrics.write({"step": 0, "kind": "eval", **self.evaluate()})
        bar = tqdm(total=t.max_steps, initial=self.step, desc=f"{c.command}", dynamic_ncols=True,
                   disable=not (c.output.progress and dist.is_main()))
        t_start = time.time()
        while self.step < t.max_steps:
            t0 = time.time()
            m = self.train_step()
            self.step += 1
            dt = time.time() - t0
            # lr: the LR the step's update(s) trained with (mean over its mini-batches), not the next one;
            # tokens is the global count (summed over ranks)
            row = {"step": self.step, "kind": "train", **m,
                   "step_time": dt, "tokens_per_s": m.get("tokens", 0) / max(dt, 1e-9)}
            if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
                raise FloatingPointError(f"non-finite metrics at step {self.step}: {row}")
            self.metrics.write(row)
            post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "reward" in row:
                post.update(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}")
                if "sft_share" in row:
                    post["sft"] = f"{row['sft_share']:.2f}"
            last = self.step == t.max_steps
            if self._has_eval() and (last or (c.output.eval_every and self.step % c.output.eval_every == 0)):
                ev = self.evaluate()
                self.metrics.write({"step": self.step, "kind": "eval", **ev})
                key = "eval/accuracy" if "eval/accuracy" in ev else "eval/pair_accuracy"
                post["eval_acc"] = f"{ev[key]:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if last or (c.output.save_every and self.step % c.output.save_every == 0):
                self.save()
        bar.close()
        self.save_final(os.path.join(self.out, "final"))
        if c.output.plots and dist.is_main():
            from .plots import plot_metrics
            plot_metrics(self.metrics.path, os.path.join(self.out, "plots.png"), title=f"upg-train {c.command}")
        return {"train_time": time.time() - t_start}
