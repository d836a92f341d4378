"""Model-parallel forms of the losses: vocabulary-parallel lm_heads (:class:`VocabParallelOptions`,
:mod:`.vocab`) and the context-parallel reductions (:func:`cp_sum`, :func:`seq_sum`, :mod:`.comm`).
docs/distributed.md says which call to make and what each collective costs."""
from .comm import cp_sum, seq_sum
from .vocab import VocabParallelOptions, vocab_parallel_logprobs

__all__ = ["VocabParallelOptions", "vocab_parallel_logprobs", "cp_sum", "seq_sum"]
