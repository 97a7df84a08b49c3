"""``memento-eval``: accuracy and KV evaluation of Memento models.

- :mod:`.config` — :class:`EvalConfig` (``recipe=NAME|PATH`` < ``key=value`` overrides, validated);
- :mod:`.scoring` — answer extraction and equivalence with ``math-verify``;
- :mod:`.metrics` — pass@k (unbiased), maj@k, KV peak / AUC (tokens, GB), compression, blocks;
- :mod:`.report` — ``generations.jsonl``, ``summary.json`` / ``summary.md``, ``kv_sawtooth.png``;
- :mod:`.runner` — problems → prompts → generator → scores → report (:func:`run_eval`);
- :mod:`.scripted` — :class:`ScriptedEngine`, canned responses with real block/KV bookkeeping;
- :mod:`.cli` — the ``memento-eval`` console script.
"""

from memento_train.evaluation.config import EvalConfig, SamplingOptions, build_config
from memento_train.evaluation.metrics import KVCost, SampleResult, mean_maj_at_k, mean_pass_at_k, pass_at_k, summarize
from memento_train.evaluation.scoring import equivalence_classes, extract_answer, is_correct, majority_answer

__all__ = [
    "EvalConfig",
    "KVCost",
    "SampleResult",
    "SamplingOptions",
    "build_config",
    "equivalence_classes",
    "extract_answer",
    "is_correct",
    "majority_answer",
    "mean_maj_at_k",
    "mean_pass_at_k",
    "pass_at_k",
    "summarize",
]


def __getattr__(name: str):
    if name == "EvalConfigError":  # deprecated alias of ConfigError (see memento_train.evaluation.config)
        from memento_train.evaluation import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
