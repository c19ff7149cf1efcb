"""Evaluation: MMLU-style multiple choice, HumanEval and perplexity, on a local model or any
OpenAI-compatible endpoint (see docs/evaluation.md).

The lm-evaluation-harness adapter lives in `gptoss.eval.lm_eval_adapter` (it needs `lm-eval`).
"""

from gptoss.eval.endpoint import EndpointModel, EndpointUnsupported
from gptoss.eval.humaneval import check_completions, load_problems, pass_at_k, run_humaneval
from gptoss.eval.mmlu import Question, load_mmlu, run_mmlu
from gptoss.eval.models import EvalModel, GenerationRequest, LocalModel
from gptoss.eval.perplexity import run_perplexity
from gptoss.eval.results import EvalResult
from gptoss.eval.sandbox import ExecutionResult, SandboxLimits, run_python

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
