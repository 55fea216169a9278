"""Evaluation of a training checkpoint: perplexity on datasets or raw files, and
lm-evaluation-harness tasks through a model adapter. CLI: `python -m megatron_plugin.evaluate`."""

from megatron_plugin.evaluate.perplexity import PerplexityResult, perplexity, score_windows

__all__ = ["PerplexityResult", "perplexity", "score_windows"]
