"""A scalar head on a transformer trunk: the reward model of ``upg-train rm`` and PPO's critic.

``ScalarHeadModel(lm, head)``: ``lm`` is any transformers causal LM (its decoder gives the hidden
states; its lm_head is kept but unused) or a sequence-classification model (its ``score`` /
``classifier`` linear becomes the head); ``head`` is ``Linear(H, 1)``. ``values(...)`` is the head
on every position, ``[B, T]``; a sequence's reward is the value at its last real token.

A checkpoint (``save``) is the trunk's ``save_pretrained`` directory plus ``value_head.safetensors``
and ``upg_value_model.json``; ``load_scalar_model`` reads it back, or starts from a plain causal LM
(fresh head) or a sequence-classification model (its own head). ``rm:PATH`` in ``reward.funcs``
scores completions with such a checkpoint (``RMReward``).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .model import get_decoder, load_model_and_tokenizer, load_tokenizer_from, pick_dtype

MARKER = "upg_value_model.json"
HEAD_FILE = "value_head.safetensors"


class ScalarHeadModel(nn.Module):
    def __init__(self, lm: nn.Module, head: nn.Linear):
        super().__init__()
        self.lm, self.head = lm, head

    def values(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """``[B, T]``: the head on the trunk's last hidden state at every position."""
        out = get_decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def save(self, path: str, tokenizer=None, state_dict: Optional[dict] = None) -> None:
        from safetensors.torch import save_file
        sd = self.state_dict() if state_dict is None else state_dict
        lm_sd = {k[3:]: v for k, v in sd.items() if k.startswith("lm.")}
        self.lm.save_pretrained(path, state_dict=lm_sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_file({k[5:]: v.detach().contiguous().cpu() for k, v in sd.items() if k.startswith("head.")},
                  os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump({"kind": "scalar_head", "hidden_size": self.head.in_features}, f)


def new_head(hidden: int, dtype, device, seed: int = 0, zero: bool = False) -> nn.Linear:
    """``Linear(H, 1)``: zeros (a critic starts at V = 0), or N(0, 1/(H+1)) (a reward head; TRL's init)."""
    head = nn.Linear(hidden, 1)
    if zero:
        nn.init.zeros_(head.weight)
    else:
        g = torch.Generator().manual_seed(seed + 17)
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5, generator=g)
    nn.init.zeros_(head.bias)
    return head.to(device=device, dtype=dtype)


def _hidden_size(lm) -> int:
    cfg = lm.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))


def is_scalar_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def load_scalar_model(path: str, *, dtype: str = "auto", device: str = "auto", seed: int = 0,
                      attn_implementation: Optional[str] = "sdpa", trust_remote_code: bool = False,
                      zero_head: bool = False):
    """(ScalarHeadModel, tokenizer, device) from an ``upg-train rm`` checkpoint, a sequence-classification
    model (``*ForSequenceClassification``, one label) or a causal LM / 'embedded' (fresh head)."""
    cfg_file = os.path.join(path, "config.json")
    arch = []
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            arch = json.load(f).get("architectures") or []
    if not is_scalar_checkpoint(path) and any(a.endswith("ForSequenceClassification") for a in arch):
        from transformers import AutoModelForSequenceClassification
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        m = AutoModelForSequenceClassification.from_pretrained(path, dtype=pick_dtype(dtype, dev),
                                                               trust_remote_code=trust_remote_code).to(dev)
        head = getattr(m, "score", None) or getattr(m, "classifier", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"{path!r}: a sequence-classification reward model needs a Linear(H, 1) 'score' "
                             f"or 'classifier' head (num_labels=1), got {head}")
        tok = load_tokenizer_from(path, trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return ScalarHeadModel(m, head), tok, dev
    lm, tok, dev = load_model_and_tokenizer(path, dtype=dtype, device=device, seed=seed,
                                            attn_implementation=attn_implementation,
                                            trust_remote_code=trust_remote_code)
    w = next(lm.parameters())
    head = new_head(_hidden_size(lm), w.dtype, dev, seed=seed, zero=zero_head)
    if is_scalar_checkpoint(path):
        from safetensors.torch import load_file
        sd = load_file(os.path.join(path, HEAD_FILE))
        head = nn.Linear(head.in_features, 1, bias="bias" in sd)  # a sequence-classifier's score has none
        head.load_state_dict(sd)
        head.to(device=dev, dtype=w.dtype)
    return ScalarHeadModel(lm, head), tok, dev


def sequence_batch(seqs: list[list[int]], pad_id: int):
    """Right-padded ids, attention mask, position ids and the index of each sequence's last token."""
    if not seqs or any(not s for s in seqs):
        raise ValueError("sequence_batch needs non-empty sequences")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids, att, pos, last


def sequence_scores(model: ScalarHeadModel, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """``[N]``: the head's value at the last token of each sequence (the reward of a prompt+completion)."""
    ids, att, pos, last = sequence_batch(seqs, pad_id)
    v = model.values(ids.to(device), att.to(device), pos.to(device))
    return v.gather(1, last.to(device)[:, None])[:, 0]


class RMReward:
    """``rm:PATH`` reward function (TRL signature): the reward model's score of prompt + completion,
    both tokenized as in training (chat template for the prompt, completion + EOS)."""

    def __init__(self, path: str, batch_size: int = 64):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"reward model {path!r} not found (a directory written by `upg-train rm`)")
        self.path, self.batch_size = path, batch_size
        self.model, self.tok, self.device = load_scalar_model(path)
        self.model.eval().requires_grad_(False)
        self.__name__ = f"rm:{os.path.basename(os.path.normpath(path))}"

    @torch.no_grad()
    def __call__(self, prompts, completions, **_):
        from .data import encode_completion, encode_prompt
        seqs = [encode_prompt(self.tok, p) + encode_completion(self.tok, c) for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(seqs), self.batch_size):
            out += sequence_scores(self.model, seqs[i:i + self.batch_size], self.tok.pad_token_id,
                                   self.device).tolist()
        return out
