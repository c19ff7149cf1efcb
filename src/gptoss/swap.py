"""Module swaps from outside the model: the same parameters behind another forward.

The native kernels (`inference/native.py`) and expert/tensor parallelism (`distributed.py`) change
how a module computes without changing what it holds, so checkpoints, tying and optimizer state
see the same tensors.
"""

from __future__ import annotations

from torch import nn


def rebuilt(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` holding `module`'s parameters, buffers and children (the same objects) and its
    settings (its public attributes): the same module, its state_dict unchanged, behind another
    forward."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in vars(module).items():
        if not name.startswith("_"):
            setattr(new, name, value)
    persistent = set(module.state_dict(keep_vars=True))
    if isinstance(module, nn.Linear) and module.bias is None:  # (named_parameters skips None)
        new.register_parameter("bias", None)
    for name, param in module.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        new.register_buffer(name, buffer, persistent=name in persistent)
    for name, child in module.named_children():
        new.add_module(name, child)
    return new
