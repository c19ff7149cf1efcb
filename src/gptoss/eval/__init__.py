"""Evaluation: MMLU-style multiple choice, HumanEval and perplexity, on a local model or any
OpenAI-compatible endpoint (see docs/evaluation.md).

The lm-evaluation-harness adapter lives in `gptoss.eval.lm_eval_adapter` (it needs `lm-eval`).
"""

from gptoss._lazy import lazy_attributes

_ORIGINS = {
    "gptoss.eval.endpoint": (
        "EndpointModel",
        "EndpointUnsupported",
    ),
    "gptoss.eval.humaneval": (
        "check_completions",
        "load_problems",
        "pass_at_k",
        "run_humaneval",
    ),
    "gptoss.eval.mmlu": (
        "Question",
        "load_mmlu",
        "run_mmlu",
    ),
    "gptoss.eval.models": (
        "EvalModel",
        "GenerationRequest",
        "LocalModel",
    ),
    "gptoss.eval.perplexity": ("run_perplexity",),
    "gptoss.eval.results": ("EvalResult",),
    "gptoss.eval.sandbox": (
        "ExecutionResult",
        "SandboxLimits",
        "run_python",
    ),
}
__all__ = [
    "EndpointModel",
    "EndpointUnsupported",
    "EvalModel",
    "EvalResult",
    "ExecutionResult",
    "GenerationRequest",
    "LocalModel",
    "Question",
    "SandboxLimits",
    "check_completions",
    "load_mmlu",
    "load_problems",
    "pass_at_k",
    "run_humaneval",
    "run_mmlu",
    "run_perplexity",
    "run_python",
]
__getattr__ = lazy_attributes(__name__, _ORIGINS)
