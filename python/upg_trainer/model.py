"""Loading a causal LM and exposing what the fused loss needs: decoder hidden states + lm_head.

The trainer never asks the model for its full ``[B, T, V]`` logits: it runs the decoder
(``model.get_decoder()``) for the last hidden states and hands them, with the lm_head weight
(and bias), to ``upg_kernels``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED = "embedded"


@dataclass
class Head:
    """The output layer as the fused loss sees it."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float64": torch.float64}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16, float16 or float64")
    return table[name]


def load_model_and_tokenizer(path: str = EMBEDDED, *, dtype: str = "auto", device: str = "auto",
                             attn_implementation: Optional[str] = "sdpa", seed: int = 0,
                             trust_remote_code: bool = False):
    """(model, tokenizer, device). ``path="embedded"`` builds the shipped tiny model, randomly initialised."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dt = pick_dtype(dtype, dev)
    kw = {} if attn_implementation in (None, "", "auto") else {"attn_implementation": attn_implementation}
    if path == EMBEDDED:
        from .task import load_tokenizer
        with open(os.path.join(ASSETS, "tiny_qwen2.json")) as f:
            cfg = AutoConfig.for_model(**json.load(f))
        torch.manual_seed(seed)  # the random init is a function of the seed
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt, **kw)
        tok = load_tokenizer()
    else:
        if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"model path {path!r} does not exist (HF_HUB_OFFLINE=1: no hub)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=trust_remote_code, **kw)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"could not load a causal LM from {path!r}: {e}") from e
        tok = load_tokenizer_from(path, trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
    model.to(dev)
    get_head(model)  # fail early on a model the fused loss cannot use
    return model, tok, dev


def load_reference_model(path: str, *, dtype: str = "auto", device: str = "auto",
                         attn_implementation: Optional[str] = "sdpa", seed: int = 0,
                         trust_remote_code: bool = False):
    """The frozen reference model of a KL / chi2 / hellinger loss loaded from ``path`` (no tokenizer)."""
    model, _tok, _dev = load_model_and_tokenizer(path, dtype=dtype, device=device,
                                                 attn_implementation=attn_implementation, seed=seed,
                                                 trust_remote_code=trust_remote_code)
    return freeze(model)


def freeze(model):
    """Eval mode, no gradients (a reference model)."""
    model.eval()
    model.requires_grad_(False)
    return model


# config attributes by which some transformers models rescale their logits after the lm_head
# (Cohere: logits * logit_scale; Granite: logits / logits_scaling; Falcon-H1: * lm_head_multiplier).
# The fused loss computes softmax(softcap(hidden @ W.T + b) / T) and nothing else, so these are refused.
LOGIT_SCALE_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_logits_scale")


def load_tokenizer_from(path: str, trust_remote_code: bool = False):
    """AutoTokenizer, except for a plain tokenizers-backed tokenizer (like the embedded one).

    transformers 5's AutoTokenizer picks the tokenizer class from the model type (qwen2 ->
    Qwen2Tokenizer, which brings its own pre-tokenizer) even when ``tokenizer_config.json`` names
    the generic backend; such a directory is loaded with ``PreTrainedTokenizerFast`` instead.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def get_head(model) -> Head:
    """The lm_head weight/bias and final-logit softcap, or a clear error."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None): "
                         "the trainer needs a causal LM with an output projection "
                         "(load it with AutoModelForCausalLM, not AutoModel)")
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output layer is {type(head).__name__}, not nn.Linear: "
                         "the fused loss needs a plain linear lm_head")
    cfg = getattr(model, "config", None)
    for name in LOGIT_SCALE_ATTRS:
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) != 1.0:
            raise ValueError(f"{type(model).__name__} scales its logits (config.{name}={v}): the fused loss "
                             "computes softmax(softcap(hidden @ lm_head.T)) without a logit scale, so training "
                             "it would optimise the wrong distribution (not supported)")
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return Head(head.weight, head.bias, float(softcap) if softcap else None)


@torch.no_grad()
def check_fused_logprobs(model, softcap: Optional[float] = None, backend: str = "auto",
                         n_tokens: int = 8) -> Optional[float]:
    """Compare the fused log-probs (decoder hidden states + lm_head, ``softcap``) with
    ``log_softmax(model(ids).logits)`` on a few random tokens; raise when they disagree (a logit
    transform the trainer does not reproduce). Returns the max abs difference, or None when the
    model's own forward could not be run (the check is then skipped with a warning)."""
    from upg_kernels import token_logprobs

    head = model.get_output_embeddings()
    V = int(head.weight.shape[0])
    dev = head.weight.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, n_tokens + 1), generator=g).to(dev)
    was_training = model.training
    model.eval()
    try:
        try:
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        except Exception as e:  # an unusual forward signature: nothing to compare against
            print(f"[upg-train] warning: could not run {type(model).__name__}'s forward to check the fused "
                  f"log-probs against its logits ({type(e).__name__}: {e}); check skipped")
            return None
        want = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        h = hidden_states(model, ids[:, :-1])
        got = token_logprobs(h, head.weight, ids[:, 1:], bias=head.bias, softcap=softcap, backend=backend)
    finally:
        model.train(was_training)
    diff = float((got.float() - want).abs().max())
    tol = 1e-3 if head.weight.dtype in (torch.float32, torch.float64) else 0.5
    if not diff <= tol:
        raise ValueError(f"{type(model).__name__}: the fused log-probs (decoder hidden states @ lm_head, "
                         f"softcap={softcap}) differ from log_softmax(model(ids).logits) by {diff:.3g} "
                         f"(> {tol}): the model transforms its logits in a way the fused loss does not "
                         "reproduce, so the trainer cannot train it")
    return diff


def get_decoder(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None:
        dec = getattr(model, "model", None)
    if dec is None:
        raise ValueError(f"{type(model).__name__} exposes no decoder (get_decoder()/model)")
    return dec


def hidden_states(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of the decoder (after its final norm), no logits."""
    out = get_decoder(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
