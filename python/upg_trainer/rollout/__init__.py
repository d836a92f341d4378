"""Rollout engines behind one interface (see ``base.py``)."""
from .base import Rollout, RolloutEngine, group

__all__ = ["Rollout", "RolloutEngine", "group", "make_engine"]


def make_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """Build the rollout engine ``name`` ("hf" = transformers generate, "vllm")."""
    if name in ("hf", "transformers"):
        from .hf_engine import HFEngine
        return HFEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        try:
            from .vllm_engine import VLLMEngine
        except ImportError as e:  # the module itself or vllm missing
            raise RuntimeError(f"rollout engine 'vllm' is not available: {e}. "
                               "Install it with `pip install upg-kernels[vllm]` (needs CUDA) "
                               "or use --rollout.engine hf.") from e
        return VLLMEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}: use 'hf' or 'vllm'")
