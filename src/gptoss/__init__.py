"""gptoss: the gpt-oss model family — exact model math, checkpoints, inference, serving, training."""

__version__ = "0.1.0"
