"""The training loop for SFT, GRPO and HPT, all through ``upg_kernels.unified_policy_loss``.

One step:
  * sft:  take ``batch_size`` samples, pack them, NLL on the completion tokens.
  * grpo: take ``batch_size`` prompts, sample ``n`` rollouts each, score them, group advantages,
          clipped policy loss (the preset decides the details).
  * hpt:  as grpo, then per prompt P = mean correctness: P > gamma -> its rollouts are RL rows,
          else its demonstration is one SFT row (``is_demo``); one mixed batch, one loss call.

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
from typing import Optional

import torch
import yaml

from upg_kernels.losses import LossConfig, batch_totals, group_advantages, unified_policy_loss

from . import distributed as dist
from .checkpoint import (MetricsLog, clean_partial, list_checkpoints, load_checkpoint,
                         load_model_weights, read_metrics, save_checkpoint, set_rng_state)
from .config import Config
from .data import (PromptSampler, RowBatch, build_rows, check_columns, encode_completion,
                   encode_prompt, load_rows, pack_rows, prompt_text)
from .model import (check_fused_logprobs, freeze, get_head, hidden_states, load_model_and_tokenizer,
                    load_reference_model)
from .ppo import PPOSteps
from .preference import PreferenceSteps, load_preference_rows
from .rewards import RewardSet
from .samples import (Sample, keep_informative_groups, process_advantages, soft_overlong_punishment,
                      step_ends)
from .rollout import make_engine
from .schedule import make_scheduler

TIME_KEYS = ("time", "step_time", "tokens_per_s", "rollout_time", "elapsed")


def make_loss_config(cfg: Config) -> LossConfig:
    """The LossConfig of the run: the preset (``loss.preset`` or the command's) + ``loss.overrides``."""
    name = cfg.loss_preset()
    ov = dict(cfg.loss.overrides or {})
    if "hpt_gamma" in ov:
        raise ValueError("loss.overrides hpt_gamma is not used by upg-train: the HPT gate reads --hpt.gamma; "
                         f"pass --hpt.gamma {ov['hpt_gamma']} instead")
    base = LossConfig.preset(name, **ov)
    if "max_completion_length" not in ov and "seq_mean_token_sum_norm" in (base.aggregation, base.demo_aggregation):
        mcl = cfg.data.max_completion_tokens if cfg.command == "sft" else cfg.rollout.max_new_tokens
        base = base.replace(max_completion_length=int(mcl))
    cmd = cfg.command
    if cmd == "ppo" and base.advantage != "given":
        raise ValueError(f"`upg-train ppo` trains on GAE advantages: use a preset with advantage='given' "
                         f"(ppo), got {name!r}")
    if cmd == "sft" and base.advantage != "one":
        raise ValueError(f"loss preset {name!r} needs rewards/advantages: use it with `upg-train grpo`, "
                         "not `sft` (sft presets: sft, dft)")
    if cmd in ("grpo", "hpt") and base.advantage in ("one", "given"):
        raise ValueError(f"loss preset {name!r} (advantage={base.advantage!r}) is not a group RL loss; "
                         "use grpo, dr_grpo, dapo, bnpo, gspo, cispo, sapo, rloo, hpt or hpt_release")
    if cmd == "hpt" and base.demo_part != "sft":
        raise ValueError(f"`upg-train hpt` needs a preset with SFT demonstrations (hpt, hpt_release), "
                         f"got {name!r}")
    if cmd == "grpo" and base.demo_part is not None:
        raise ValueError(f"loss preset {name!r} trains on demonstrations: use `upg-train hpt`")
    return base


def needs_reference(lc: Optional[LossConfig]) -> bool:
    """A KL term (kl_coef > 0) or a chi2/hellinger likelihood needs reference-model log-probs."""
    return lc is not None and (lc.kl_coef > 0 or lc.likelihood in ("chi2", "hellinger"))


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


TRAIN_COMMANDS = ("sft", "grpo", "hpt", "rm", "dpo", "ppo")
SINGLE_PROCESS = ("rm", "dpo", "ppo")  # not yet run under torchrun (docs/trainer.md, limitations)


class Trainer(PreferenceSteps, PPOSteps):
    """One loop (``train``) for every command; a command is a step method (``STEPS``) that builds its
    micro-batches and calls the shared accumulation/update ``_update`` with its loss."""

    STEPS = {"sft": "sft_step", "grpo": "rl_step", "hpt": "rl_step", "rm": "rm_step", "dpo": "dpo_step",
             "ppo": "ppo_step"}

    def __init__(self, cfg: Config, model=None, tokenizer=None):
        self.cfg = cfg
        dist.init_distributed()
        torch.manual_seed(cfg.train.seed)
        if cfg.command in SINGLE_PROCESS and dist.world_size() > 1:
            raise ValueError(f"`upg-train {cfg.command}` runs in one process for now (world size "
                             f"{dist.world_size()}); run it without torchrun")
        if cfg.command in SINGLE_PROCESS and cfg.train.strategy != "none":
            raise ValueError(f"`upg-train {cfg.command}` supports train.strategy none only")
        if cfg.command == "rm" and model is None:
            from .value_model import load_scalar_model
            m = cfg.model
            model, tokenizer, self.device = load_scalar_model(
                m.path, dtype=m.dtype, device=m.device, seed=cfg.train.seed,
                attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)
        elif model is None:
            model, tokenizer, self.device = load_model_and_tokenizer(
                cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device,
                attn_implementation=cfg.model.attn_implementation, seed=cfg.train.seed,
                trust_remote_code=cfg.model.trust_remote_code)
        else:
            self.device = next(model.parameters()).device
        # final-logit softcapping (Gemma-2 style) goes to every log-prob / loss call; a logit scale is
        # refused by get_head; the fused log-probs are checked once against the model's own logits
        self.softcap = None
        if cfg.command != "rm":  # the reward model is never asked for log-probs
            self.softcap = get_head(model).softcap
            check_fused_logprobs(model, self.softcap, backend=cfg.loss.backend)
        if cfg.command == "dpo" and self.softcap is not None:
            raise ValueError("`upg-train dpo`: preference_loss has no final-logit softcapping; this model "
                             f"softcaps its logits (final_logit_softcapping={self.softcap})")
        self.lm, self.tok = model, tokenizer
        self.out = cfg.output.dir
        self.metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), enabled=dist.is_main())
        self.step = 0
        self.sampler: Optional[PromptSampler] = None
        self._prompt_cache: dict = {}
        self._extra_loss = None   # PPO shared critic: a value term added inside the policy forward
        self.replay = None

        # data
        d = cfg.data
        need = {"sft": [d.prompt_column, d.demo_column], "grpo": [d.prompt_column, d.answer_column],
                "hpt": [d.prompt_column, d.answer_column, d.demo_column], "ppo": [d.prompt_column]}.get(cfg.command)
        self.train_rows = []
        self.pair_eval_rows = []
        if cfg.command in ("rm", "dpo"):
            self.train_rows, self.pair_eval_rows = load_preference_rows(cfg)
            self.sampler = PromptSampler(len(self.train_rows), cfg.train.seed)
        if need:
            self.train_rows = load_rows(d.path, split=d.split, num=d.num_train if d.path == "embedded" else None,
                                        seed=cfg.train.seed, levels=d.levels)
            check_columns(self.train_rows, need, d.path, f"`upg-train {cfg.command}`")
            self.sampler = PromptSampler(len(self.train_rows), cfg.train.seed)
        self.eval_rows = []
        eval_path = d.eval_path
        if eval_path == "auto":
            eval_path = "embedded" if d.path == "embedded" or cfg.command == "eval" else ""
        if cfg.command in ("rm", "dpo"):  # held-out pairs above; dpo on the embedded task: greedy accuracy too
            eval_path = "embedded" if cfg.command == "dpo" and d.path == "embedded" and d.eval_path else ""
        if eval_path:
            self.eval_rows = load_rows(eval_path, split=d.eval_split, num=d.num_eval, seed=cfg.train.seed,
                                       levels=d.eval_levels, eval_set=True)
            check_columns(self.eval_rows, [d.prompt_column, d.answer_column], eval_path, "evaluation")
        if cfg.command == "sft" and d.replay_path:
            from .data import ReplaySampler
            self.replay = ReplaySampler(load_rows(d.replay_path, split=d.split), d.replay_column, d.replay_ratio,
                                        self.tok, d.max_completion_tokens, cfg.train.seed, d.replay_path)
        needs_reward = cfg.command in ("grpo", "hpt", "ppo") or bool(self.eval_rows)
        self.rewards = RewardSet(cfg.reward.funcs, cfg.reward.weights) if needs_reward else None
        self.eval_rewards = self.rewards
        if cfg.reward.eval_funcs and self.eval_rows:  # e.g. ppo trained on rm:PATH, evaluated by the verifier
            self.eval_rewards = RewardSet(cfg.reward.eval_funcs)
        self.loss_cfg = make_loss_config(cfg) if cfg.command in ("sft", "grpo", "hpt", "ppo") else None
        self.pref_cfg = None
        if cfg.command == "dpo":
            from upg_kernels import PreferenceConfig
            self.pref_cfg = PreferenceConfig.preset(cfg.pref.preset, **dict(cfg.pref.overrides or {}))
        ws = dist.world_size()
        if cfg.rollout.dynamic_sampling and ws > 1:
            raise ValueError("rollout.dynamic_sampling runs in one process for now (each rank would need the "
                             "same number of generate rounds); run without torchrun")
        if cfg.command in TRAIN_COMMANDS and cfg.train.batch_size < ws:
            what = "samples" if cfg.command == "sft" else "prompts"
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is smaller than the world size {ws}: every "
                             f"rank needs at least one of the step's {what}; use --train.batch_size >= {ws}")
        if (cfg.command in ("grpo", "hpt") and ws > 1 and cfg.rollout.engine == "hf"
                and cfg.train.batch_size % ws):
            # the hf engine generates in lock-step across ranks (FSDP2 gathers per forward): equal prompt
            # counts per rank keep the number of generate calls equal, so no rank waits forever
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the world size "
                             f"{ws} with rollout.engine=hf (equal prompts per rank)")

        # the reference model (KL / chi2 / hellinger): built from the initial weights, before a resume
        # loads the checkpoint's weights into the policy, so a resumed run gets the same reference
        self.ref, self.ref_softcap = None, None
        if (needs_reference(self.loss_cfg) or (self.pref_cfg is not None and self.pref_cfg.use_reference)
                or (cfg.command == "ppo" and (cfg.ppo.kl_coef > 0 or cfg.ppo.adaptive_kl))):
            self.ref = self._build_reference()
        if cfg.command == "ppo":
            self._setup_critic()

        # resume: weights go into the plain model before it is wrapped
        self.resume_state = None
        if cfg.command in TRAIN_COMMANDS:
            self._prepare_output()
        if self.ref is not None:
            self._check_reference()
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
        self.engine = None if cfg.command == "rm" else make_engine(r.engine, self.model, self.tok, batch_size=r.batch_size,
                                  gpu_memory_utilization=r.gpu_memory_utilization,
                                  max_model_len=r.max_model_len or cfg.data.max_prompt_tokens + r.max_new_tokens,
                                  sleep_level=r.sleep_level, seed=cfg.train.seed,
                                  dtype="bfloat16" if bf16 else None,
                                  return_logprobs=getattr(self.loss_cfg, "rollout_is", None) is not None)
        t = cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.sched = make_scheduler(self.opt, t.schedule, t.max_steps * t.mini_batches, t.warmup_steps,
                                    t.min_lr_ratio)
        if self.resume_state is not None:
            opt_state, st = self.resume_state
            dist.load_full_optimizer_state_dict(self.model, self.opt, opt_state)
            self.sched.load_state_dict(st["scheduler"])
            self.sampler.pos = st["data_pos"]
            if self.replay is not None:
                self.replay.sampler.pos = st["replay_pos"]
            if cfg.command == "ppo":
                self.load_critic_state(st["ppo"])
            self.step = st["step"]
            set_rng_state(st["rng"])

    # ------------------------------------------------------------------------------- setup
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
            why = (f"loss kl_coef={self.loss_cfg.kl_coef} / likelihood={self.loss_cfg.likelihood!r}"
                   if self.cfg.command not in ("dpo", "ppo") else f"`upg-train {self.cfg.command}`")
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
        cfg, out = self.cfg, self.out
        os.makedirs(out, exist_ok=True)
        if dist.is_main():
            clean_partial(out)
        ckpts = list_checkpoints(out)
        if cfg.output.resume and ckpts:
            step, path = ckpts[-1]
            sd, opt_state, st = load_checkpoint(path)
            if cfg.command == "rm":  # value_head.safetensors holds the head's weight/bias
                self.lm.head.load_state_dict({k: sd.pop(k) for k in ("weight", "bias") if k in sd})
                load_model_weights(self.lm.lm, sd, path)
            else:
                load_model_weights(self.lm, sd, path)
            self.resume_state = (opt_state, st)
            self.metrics.truncate_after(step)  # drop rows of steps after the checkpoint (they are redone)
            print(f"[upg-train] resuming from {path} (step {step})") if dist.is_main() else None
            return
        # a run = a checkpoint or a logged training step; a start that failed before its first step (only
        # config.yaml, an empty metrics.jsonl or a step-0 eval row) is not one and is started over
        has_run = bool(ckpts) or any(r.get("kind") == "train" for r in read_metrics(self.metrics.path))
        if has_run and not (cfg.output.resume or cfg.output.overwrite):
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

    def _prompt_ids(self, row) -> list[int]:
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
    def _temperature(self) -> float:
        """The temperature of the loss (and of the old / reference log-probs): 1 for sft, the sampler's otherwise."""
        return 1.0 if self.cfg.command in ("sft", "dpo", "rm") else self.cfg.rollout.temperature

    def _micro_loss(self, mb: RowBatch, cfg: LossConfig, extra: dict, box: list):
        def fn(lm):
            h = hidden_states(lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
            w, b = dist.output_weight(lm)
            out = unified_policy_loss(h, w, mb.targets, config=cfg, loss_mask=mb.loss_mask, bias=b,
                                      temperature=self._temperature(), softcap=self.softcap,
                                      backend=self.cfg.loss.backend, **extra)
            box.append(out)
            if self._extra_loss is not None:  # PPO shared critic: the value loss on the same hidden states
                return out.loss + self._extra_loss(h)
            return out.loss
        return dist.forward_call(self.model, fn)

    def _policy_loss_of(self, micro: list[tuple[RowBatch, dict]]):
        """``loss_of`` for ``unified_policy_loss``: every micro-batch's loss divides by the totals of the whole
        batch (``batch_totals`` over every micro-batch of every rank, once per optimizer step), times the
        world size that DDP/FSDP gradient averaging divides by, so the micro-batch losses add up to the
        batch loss. Padding micro-batches (``RowBatch.padding``) count nowhere and add exactly 0."""
        lc = self.loss_cfg
        real = [(mb, extra) for mb, extra in micro if not mb.padding]
        totals = batch_totals([(mb.loss_mask != 0) & (mb.targets != -100) for mb, _ in real],
                              is_demo=[extra.get("is_demo") for _, extra in real],
                              group=torch.distributed.group.WORLD if dist.is_distributed() else None)
        ws = totals.world_size
        cfg_ws = lc if ws == 1 else lc.replace(
            rl_coef=lc.rl_coef * ws, **({"demo_coef": lc.demo_coef * ws} if lc.demo_part is not None else {}))

        n_all = totals.main_tokens + totals.demo_tokens

        def loss_of(k, mb, extra):
            box: list = []
            loss = self._micro_loss(mb, cfg_ws, extra if mb.padding else dict(extra, totals=totals), box)
            # metric weight: the micro-batch's tokens (0 for a padding micro-batch); its loss parts are its
            # shares of the batch's, so they enter the token-weighted mean scaled to add up
            n = float(((mb.loss_mask != 0) & (mb.targets != -100)).sum())
            metrics = dict(box[0].metrics)
            for key in ("loss_main", "loss_demo"):
                if n and key in metrics:
                    metrics[key] *= n_all / n
            return loss, metrics, n
        return loss_of

    def _update(self, micro: list[tuple[RowBatch, dict]], loss_of=None, *, model=None, opt=None,
                sched=None) -> dict:
        """One optimizer update over micro-batches: the one accumulation loop of every step.

        ``loss_of(k, mb, extra) -> (loss, metrics, weight)`` gives micro-batch ``k``'s share of the batch
        loss (the shares add up to the batch loss), its metrics and their weight in the logged mean;
        default: the unified policy loss (``_policy_loss_of``). ``model``/``opt``/``sched`` default to the
        policy's (PPO's separate critic passes its own)."""
        model = self.model if model is None else model
        opt = self.opt if opt is None else opt
        sched = self.sched if sched is None and model is self.model else sched
        loss_of = self._policy_loss_of(micro) if loss_of is None else loss_of
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
    def _split(items: list, k: int) -> list[list]:
        """Exactly ``k`` contiguous chunks (sizes differ by at most one; some are empty when
        ``len(items) < k``). Every rank gets ``k`` chunks whatever its item count, so every rank runs the
        same number of mini-batches, micro-batches, forwards and collectives (an empty chunk becomes a
        padding row, see ``_pad_batch``)."""
        n = len(items)
        return [items[i * n // k:(i + 1) * n // k] for i in range(k)]

    def _pad_batch(self) -> RowBatch:
        """One row with an all-zero loss mask: run for an empty chunk so the rank still joins every FSDP2
        all-gather / DDP all-reduce of the micro-batch; it adds exactly 0 to the loss and the gradient."""
        return dataclasses.replace(build_rows([[self.tok.pad_token_id]], [[]], self.tok.pad_token_id),
                                   padding=True)

    # ------------------------------------------------------------------------------- steps
    def _sft_micro(self, samples: list[Sample]) -> list[tuple[RowBatch, dict]]:
        c = self.cfg
        micro = []
        for chunk in self._split(samples, c.train.grad_accum):
            if not chunk:
                mb = self._pad_batch()
            elif c.data.packing:
                mb = pack_rows([(s.prompt_ids, s.completion_ids) for s in chunk],
                               max(c.data.pack_tokens, max(s.num_tokens for s in chunk)),
                               self.tok.pad_token_id, dtype=next(self.lm.parameters()).dtype)
            else:
                mb = build_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                self.tok.pad_token_id)
            micro.append((mb, {}))
        return micro

    def sft_step(self) -> dict:
        c = self.cfg
        n_replay = self.replay.count(c.train.batch_size) if self.replay is not None else 0
        idx = dist.shard_batch(self.sampler.take(c.train.batch_size - n_replay))
        samples = [Sample(self._prompt_ids(self.train_rows[i]),
                          encode_completion(self.tok, self.train_rows[i][c.data.demo_column],
                                            c.data.max_completion_tokens))
                   for i in idx]
        if n_replay:
            samples += self.replay.take(n_replay)
        micro = self._sft_micro(samples)
        if self.ref is not None:
            self._fill_logprobs(micro, "ref_logprobs", self.ref, self.ref_softcap)
        m = self._update(micro)
        m["tokens"] = int(dist.all_reduce_sum(sum(s.num_tokens for s in samples)))
        m["sft_share"] = 1.0
        if self.replay is not None:
            m["replay_share"] = n_replay / c.train.batch_size
        return m

    def _generate(self, rows: list[dict], n: int, round_: int = 0):
        c = self.cfg
        prompts = [self._prompt_ids(r) for r in rows]
        self.engine.wake()
        ro = self.engine.generate(prompts, n=n, max_new_tokens=c.rollout.max_new_tokens,
                                  temperature=c.rollout.temperature, top_p=c.rollout.top_p,
                                  seed=(c.train.seed * 1_000_003 + self.step * 7919 + dist.rank()
                                        + round_ * 104_729) % 2**31)
        self.engine.sleep()
        return ro

    def _score(self, rows: list[dict], ro) -> tuple[list[float], dict, list[str]]:
        """Rewards of rollouts ``ro`` of ``rows`` (reward functions + DAPO soft overlong punishment);
        the functions also see completion_ids, completion_length and truncated."""
        c = self.cfg
        texts = self.tok.batch_decode([r.completion_ids for r in ro], skip_special_tokens=True)
        cols = self._columns([rows[r.prompt_index] for r in ro])
        cols.update(completion_ids=[list(r.completion_ids) for r in ro],
                    completion_length=[len(r.completion_ids) for r in ro],
                    truncated=[r.finish_reason == "length" for r in ro])
        reward, per = self.rewards([prompt_text(rows[r.prompt_index][c.data.prompt_column]) for r in ro],
                                   texts, cols)
        if c.reward.overlong_buffer:
            pen = [soft_overlong_punishment(len(r.completion_ids), c.rollout.max_new_tokens,
                                            c.reward.overlong_buffer, c.reward.overlong_penalty) for r in ro]
            reward = [a + b for a, b in zip(reward, pen)]
            per["overlong_punishment"] = pen
        return reward, per, texts

    def _sample_groups(self, n: int):
        """Rows, rollouts and rewards of one RL step. With ``rollout.dynamic_sampling`` (DAPO), groups whose
        rewards are all equal are dropped and more prompts are sampled, at most
        ``rollout.max_sampling_rounds`` generate calls, until ``train.batch_size`` groups are kept."""
        c = self.cfg
        want = c.train.batch_size
        rows, ro, reward, per, texts = [], [], [], {}, []
        dropped = rounds = 0
        while len(rows) < want and rounds < (c.rollout.max_sampling_rounds if c.rollout.dynamic_sampling else 1):
            new_rows = [self.train_rows[i] for i in dist.shard_batch(self.sampler.take(want - len(rows)))]
            new_ro = self._generate(new_rows, n, rounds)
            rounds += 1
            r_new, per_new, t_new = self._score(new_rows, new_ro)
            keep = (keep_informative_groups(r_new, n) if c.rollout.dynamic_sampling
                    else list(range(len(new_rows))))
            dropped += len(new_rows) - len(keep)
            for g in keep:
                gi = len(rows)
                rows.append(new_rows[g])
                for j in range(g * n, (g + 1) * n):
                    ro.append(dataclasses.replace(new_ro[j], prompt_index=gi))
                    reward.append(r_new[j])
                    texts.append(t_new[j])
                    for k, v in per_new.items():
                        per.setdefault(k, []).append(v[j])
        stats = {"sampling_rounds": rounds, "dropped_groups": dropped} if c.rollout.dynamic_sampling else {}
        return rows, ro, reward, per, texts, stats

    def _token_advantages(self, ro, per: dict, texts, n: int) -> Optional[list[list[float]]]:
        """Per-token advantages from process rewards (None when every reward is a scalar)."""
        c = self.cfg
        steps = self.rewards.step_scores({k: v for k, v in per.items() if k in self.rewards.names}, len(ro))
        if steps is None:
            return None
        step_tok = None
        if c.reward.step_token:
            step_tok = self.tok.convert_tokens_to_ids(c.reward.step_token)
            if step_tok is None or step_tok == self.tok.unk_token_id:
                raise ValueError(f"reward.step_token {c.reward.step_token!r} is not a token of the tokenizer")
        scores, ends = [], []
        for i, r in enumerate(ro):
            ids = list(r.completion_ids)
            pieces = [self.tok.decode([t], skip_special_tokens=True) for t in ids]
            e_steps = step_ends(pieces, c.reward.step_delimiter, ids, step_tok) if ids else []
            sc, en = [], []
            for vals, is_list in steps[i]:
                e = e_steps if is_list else ([len(ids) - 1] if ids else [])
                if len(vals) != len(e):
                    raise ValueError(f"a process reward function returned {len(vals)} step scores for a "
                                     f"completion with {len(e)} steps (split by reward.step_token="
                                     f"{c.reward.step_token!r} / step_delimiter={c.reward.step_delimiter!r}): "
                                     f"{texts[i]!r}")
                sc += vals
                en += e
            scores.append(sc)
            ends.append(en)
        if "overlong_punishment" in per:  # a sequence-level term: one step at the end
            for i, r in enumerate(ro):
                if r.completion_ids:
                    scores[i].append(per["overlong_punishment"][i])
                    ends[i].append(len(r.completion_ids) - 1)
        return process_advantages(scores, ends, [len(r.completion_ids) for r in ro], n, eps=self.loss_cfg.adv_eps)

    def rl_step(self) -> dict:
        c, hpt = self.cfg, self.cfg.command == "hpt"
        n = c.rollout.n
        t0 = time.time()
        rows, ro, reward, per, texts, sstats = self._sample_groups(n)
        t_roll = time.time() - t0
        R = torch.tensor(reward, dtype=torch.float32).view(len(rows), n)
        correct = (R >= c.reward.correct_threshold).float()
        P = correct.mean(1)
        use_rl = P > c.hpt.gamma if hpt else torch.ones(len(rows), dtype=torch.bool)
        tok_adv = self._token_advantages(ro, per, texts, n)
        if tok_adv is not None and hpt:
            raise ValueError("process rewards (a reward function returned step lists) train with `upg-train "
                             "grpo`; hpt's gate needs one reward per completion")
        adv = torch.zeros_like(R)
        if use_rl.any() and tok_adv is None:
            adv[use_rl] = group_advantages(R[use_rl].reshape(-1), group_size=n, mode=self.loss_cfg.advantage,
                                           eps=self.loss_cfg.adv_eps).view(-1, n).float()
        items: list[Sample] = []
        for i in range(len(rows)):
            if use_rl[i]:
                for j in range(n):
                    r = ro[i * n + j]
                    a = tok_adv[i * n + j] if tok_adv is not None else adv[i, j].item()
                    items.append(Sample(r.prompt_ids, r.completion_ids, advantage=a, logprobs=r.logprobs,
                                        trainable=not (c.rollout.overlong_filter and r.finish_reason == "length")))
            else:
                demo = encode_completion(self.tok, rows[i][c.data.demo_column], c.data.max_completion_tokens)
                items.append(Sample(self._prompt_ids(rows[i]), demo, is_demo=True))
        m_all: dict = {}
        minis = [[self._rl_micro(chunk) for chunk in self._split(mini, c.train.grad_accum)]
                 for mini in self._split(items, c.train.mini_batches)]
        for micro in minis:  # before the first update: pi_old of every mini-batch is the sampling policy
            if c.train.mini_batches > 1:
                self._fill_logprobs(micro, "old_logprobs", self.model, self.softcap)
            if self.ref is not None:
                self._fill_logprobs(micro, "ref_logprobs", self.ref, self.ref_softcap)
        for micro in minis:
            for k, v in self._update(micro).items():
                m_all.setdefault(k, []).append(v)
        m = {k: sum(v) / len(v) for k, v in m_all.items()}
        m.update(self._rollout_metrics(ro, R, correct, P, use_rl, items))
        m.update(sstats, rollout_time=t_roll)
        if c.rollout.overlong_filter:
            m["overlong_filtered"] = float(sum(not s.trainable for s in items if not s.is_demo) / max(1, len(ro)))
        return m

    def _rollout_metrics(self, ro, R, correct, P, use_rl, items) -> dict:
        lens = [len(r.completion_ids) for r in ro] or [0]
        m = dict(reward=float(R.mean()) if R.numel() else 0.0,
                 accuracy=float(correct.mean()) if R.numel() else 0.0,
                 sft_share=float((~use_rl).float().mean()) if len(use_rl) else 0.0,
                 rl_prompts=int(dist.all_reduce_sum(int(use_rl.sum()))),
                 solve_none=float((P == 0).float().mean()) if len(P) else 0.0,
                 solve_all=float((P == 1).float().mean()) if len(P) else 0.0,
                 completion_len=sum(lens) / len(lens),
                 stop_frac=sum(r.finish_reason == "stop" for r in ro) / max(1, len(ro)),
                 tokens=int(dist.all_reduce_sum(sum(s.num_tokens for s in items))))
        for k in ("reward", "accuracy", "sft_share", "solve_none", "solve_all", "completion_len", "stop_frac"):
            m[k] = dist.all_reduce_mean(m[k])
        return m

    def _columns(self, rows: list[dict]) -> dict:
        """The non-prompt columns for reward functions (TRL passes them as keyword arguments)."""
        c = self.cfg.data
        cols = {k: [r.get(k) for r in rows] for k in rows[0] if k != c.prompt_column}
        if c.answer_column != "answer" and c.answer_column in cols:
            cols.setdefault("answer", cols[c.answer_column])
        return cols

    def _rl_micro(self, chunk: list[Sample]) -> tuple[RowBatch, dict]:
        if not chunk:  # padding micro-batch: one zero-mask row, advantage 0, not a demonstration
            mb = self._pad_batch()
            extra = {"advantages": torch.zeros(1)}
            if self.loss_cfg.rollout_is is not None:
                extra["rollout_logprobs"] = torch.zeros(mb.targets.shape)
            return mb, extra
        mb = build_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], self.tok.pad_token_id)
        for i, s in enumerate(chunk):
            if not s.trainable:
                mb.loss_mask[i] = 0.0
        B, L = mb.targets.shape
        if any(isinstance(s.advantage, list) for s in chunk):  # per-token (process rewards)
            a = torch.zeros(B, L)
            for i, s in enumerate(chunk):
                v = s.advantage if isinstance(s.advantage, list) else [s.advantage] * len(s.completion_ids)
                a[i, :len(v)] = torch.tensor(v, dtype=torch.float32)
            extra = {"advantages": a}
        else:
            extra = {"advantages": torch.tensor([s.advantage for s in chunk], dtype=torch.float32)}
        if any(s.is_demo for s in chunk):
            extra["is_demo"] = torch.tensor([s.is_demo for s in chunk], dtype=torch.bool)
        if self.loss_cfg.rollout_is is not None:
            missing = sum(1 for s in chunk if not s.is_demo and s.logprobs is None)
            if missing:
                # an importance weight against log-probs of 0 would be exp(old) (silently wrong): refuse
                raise ValueError(f"loss rollout_is={self.loss_cfg.rollout_is!r} needs the sampler's log-probs, "
                                 f"but the rollout engine returned none for {missing} RL row(s) of this "
                                 f"micro-batch (rollout.engine={self.cfg.rollout.engine!r}); use an engine that "
                                 "returns them or drop rollout_is from loss.overrides / the preset")
            rl = torch.zeros(B, L)
            for i, s in enumerate(chunk):
                if s.logprobs is not None:
                    rl[i, :len(s.logprobs)] = torch.as_tensor(s.logprobs, dtype=torch.float32)
            extra["rollout_logprobs"] = rl
        return mb, extra

    @torch.no_grad()
    def _fill_logprobs(self, micro, key: str, model, softcap):
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
                    return token_logprobs(h, w, mbd.targets, bias=b, temperature=self._temperature(),
                                          backend=self.cfg.loss.backend, softcap=softcap)
                extra[key] = dist.forward_call(model, fn).cpu()
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy accuracy on the held-out rows (and per level when the rows have a 'level' column)."""
        c = self.cfg
        pair_m = self.evaluate_pairs() if c.command in ("rm", "dpo") else {}
        if not self.eval_rows:
            return pair_m
        rows = self.eval_rows
        prompts = [self._prompt_ids(r) for r in rows]
        self.engine.wake()
        ro = self.engine.generate(prompts, n=1, max_new_tokens=c.rollout.max_new_tokens, temperature=0.0, seed=0)
        self.engine.sleep()
        texts = self.tok.batch_decode([r.completion_ids for r in ro], skip_special_tokens=True)
        cols = self._columns(rows)
        reward, _ = self.eval_rewards([prompt_text(r[c.data.prompt_column]) for r in rows], texts, cols)
        ok = [float(x >= c.reward.correct_threshold) for x in reward]
        m = {"eval/accuracy": sum(ok) / len(ok), "eval/reward": sum(reward) / len(reward)}
        if "level" in rows[0]:
            for lv in sorted({r["level"] for r in rows}):
                sel = [o for o, r in zip(ok, rows) if r["level"] == lv]
                m[f"eval/acc_level{lv}"] = sum(sel) / len(sel)
        self.last_eval_samples = list(zip([prompt_text(r[c.data.prompt_column]) for r in rows[:3]], texts[:3]))
        return dict(m, **pair_m)

    # ------------------------------------------------------------------------------- checkpoints
    def save(self):
        sd = dist.full_state_dict(self.model)
        opt = dist.full_optimizer_state_dict(self.model, self.opt)
        if dist.is_main():
            st = {"scheduler": self.sched.state_dict(), "data_pos": self.sampler.pos, "command": self.cfg.command}
            if self.replay is not None:
                st["replay_pos"] = self.replay.sampler.pos
            if self.cfg.command == "ppo":
                st["ppo"] = self.critic_state()
            save_checkpoint(self.out, self.step, model_state=sd, save_model_fn=lambda p: self._save_model(p, sd),
                            optimizer_state=opt, trainer_state=st, keep_last=self.cfg.output.keep_last)
        dist.barrier()

    def _save_model(self, path: str, sd: dict, final: bool = False) -> None:
        """The policy (or the reward model) as a from_pretrained directory with its tokenizer. ``final``:
        a PPO shared value head leaves the policy's weights for ``value_head.safetensors`` beside them."""
        from .ppo import VALUE_HEAD
        from .value_model import HEAD_FILE, ScalarHeadModel
        if isinstance(self.lm, ScalarHeadModel):
            self.lm.save(path, self.tok, sd)
            return
        head = {k[len(VALUE_HEAD) + 1:]: v for k, v in sd.items() if k.startswith(VALUE_HEAD + ".")}
        if final and head:
            sd = {k: v for k, v in sd.items() if not k.startswith(VALUE_HEAD + ".")}
        self.lm.save_pretrained(path, state_dict=sd)
        self.tok.save_pretrained(path)
        if final and head:
            from safetensors.torch import save_file
            save_file({k: v.contiguous().cpu() for k, v in head.items()}, os.path.join(path, HEAD_FILE))

    def save_final(self, path: str):
        sd = dist.full_state_dict(self.model)
        if dist.is_main():
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self._save_model(tmp, sd, final=True)
            if getattr(self, "critic", None) is not None:  # ppo: final/critic, an rm-format checkpoint
                self.critic.save(os.path.join(tmp, "critic"), self.tok)
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
        dist.barrier()

    # ------------------------------------------------------------------------------- loop
    def _has_eval(self) -> bool:
        return bool(self.eval_rows) or bool(self.pair_eval_rows)

    def train(self) -> dict:
        from tqdm.auto import tqdm

        c = self.cfg
        t = c.train
        step_fn = getattr(self, self.STEPS[c.command])
        if self.step == 0 and self._has_eval():
            self.metrics.write({"step": 0, "kind": "eval", **self.evaluate()})
        bar = tqdm(total=t.max_steps, initial=self.step, desc=f"{c.command}", dynamic_ncols=True,
                   disable=not (c.output.progress and dist.is_main()))
        t_start = time.time()
        while self.step < t.max_steps:
            t0 = time.time()
            m = step_fn()
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
