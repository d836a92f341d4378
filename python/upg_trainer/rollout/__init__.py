"""Rollout engines behind one interface (see ``base.py``)."""
from .base import Rollout, RolloutEngine, group

__all__ = ["Rollout", "RolloutEngine", "group", "make_engine"]


def make_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """Build the rollout engine ``name`` ("hf" = transformers generate, "vllm")."""
    if name in ("hf", "transformers"):
        from .hf_engine import HFEngine
        return HFEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        from .vllm_engine import VLLMEngine  # raises VLLMUnavailableError (one-line install hint) without vLLM
        return VLLMEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}: use 'hf' or 'vllm'")
