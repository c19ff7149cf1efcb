"""Output head and cross-entropy computed together, a chunk of tokens at a time.

With a 201,088-token vocabulary the logits dominate a small model's step and a large model's
activation memory: (tokens × vocab) in fp32 is 3.3 GB for 4096 tokens, written, read by the
log-softmax, then written again as its gradient. Here each chunk's logits live only while that chunk
is processed, and the gradient is formed in place as softmax − one-hot and consumed at once by the
two matmuls of the backward pass (the "fused linear cross-entropy" of Liger Kernel). The FLOPs are
the same three matmuls as `lm_head` + `F.cross_entropy`; memory and memory traffic are not.

Targets equal to `IGNORE_INDEX` (−100, as in `F.cross_entropy`) are left out before the head runs:
fine-tuning learns only the assistant's tokens, so most rows would be wasted matmuls otherwise.

`causal_lm_loss` is the loss of every training run, pretraining and fine-tuning alike; it calls the
model's `hidden_states` and reads the head's weight, so the model itself is never changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gptoss.model import GptOss
from gptoss.trimmed_vocab import token_rows

# fp32 logits per chunk: 2^28 elements = 1 GiB, 1,334 tokens of a 201,088-token vocabulary. Every
# chunk reads the whole head weight three times, so smaller chunks trade memory for weight traffic
# (on a 2-core CPU a nano step took 4.0 s with 166-token chunks, 2.9 s with 1,334, in bf16).
CHUNK_ELEMENTS = 2**28
IGNORE_INDEX = -100


def _chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // vocab)


def _compute_dtype(tensor: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (it stays on inside autograd functions)."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _softmax_(logits: Tensor, targets: Tensor) -> Tensor:
    """Turn logits (n, V) into their softmax in place; return the summed cross-entropy (fp32).

    Everything stays in the logits' dtype (bf16 under mixed precision, as the gradient that the
    matmuls consume is anyway) with the sums in fp32; in-place steps keep it to a few passes over
    the (n, V) tensor, which is what a chunk costs besides its matmuls.
    """
    target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
    top = logits.amax(dim=-1, keepdim=True)
    logits.sub_(top).exp_()  # exp(logit − max) ≤ 1: no overflow
    # Sums accumulate in fp32 whatever the dtype (asking for an fp32 result would copy the tensor);
    # a bf16 result is then within 0.2%, i.e. 0.002 nats of each token's loss.
    norm = logits.sum(dim=-1, keepdim=True)
    loss = (top.float() + norm.float().log()).sum() - target_logits.sum()
    logits.div_(norm)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i −log softmax(hidden_i · Wᵀ)[target_i], with both gradients made during the forward.

    Matmuls run in the compute dtype (fp32; bf16 under autocast or FSDP's mixed precision), with the
    weight cast once rather than per chunk, and the weight gradient accumulates in fp32. A frozen
    head (LoRA) gets no weight gradient: one matmul and a (V, H) fp32 buffer fewer.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # noqa: ANN001
        dtype = _compute_dtype(hidden, weight)
        want_weight = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden)
        grad_weight: Tensor | None = None  # fp32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_tokens(weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            w, x = weight.to(dtype), hidden.to(dtype)
            for start in range(0, x.shape[0], step):
                h, t = x[start : start + step], targets[start : start + step]
                grad = h @ w.T  # (n, V) logits, becoming d(loss sum)/d(logits) = softmax − one-hot
                total += _softmax_(grad, t)
                grad[torch.arange(len(t), device=t.device), t] -= 1
                grad_hidden[start : start + step] = grad @ w
                if not want_weight:
                    continue
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)  # in place: no (V, H) temporary
                else:
                    part = grad.T @ h
                    grad_weight = part.float() if grad_weight is None else grad_weight.add_(part)
        if not want_weight:
            ctx.save_for_backward(grad_hidden)
            return total
        if grad_weight is None:  # no rows: every target was ignored
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, Tensor | None, None]:  # noqa: ANN001
        grad_hidden, *grad_weight = ctx.saved_tensors
        weight_grad = grad_weight[0] * grad_total if grad_weight else None
        return grad_hidden * grad_total, weight_grad, None


def _loss_only(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    dtype = _compute_dtype(hidden, weight)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = _chunk_tokens(weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        w, x = weight.to(dtype), hidden.to(dtype)
        for start in range(0, x.shape[0], step):
            total += _softmax_(x[start : start + step] @ w.T, targets[start : start + step])
    return total


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of `hidden` (N, H) through the head `weight` (V, H) against `targets` (N,).

    Rows whose target is `IGNORE_INDEX` add nothing and get a zero gradient. The check costs one
    comparison over the targets (and a host sync on GPU); only when something is ignored are the
    kept rows gathered.
    """
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return _loss_only(hidden, weight, targets)


def head_rows(model: GptOss, targets: Tensor) -> Tensor:
    """`targets` as rows of the output head: themselves, or for a trimmed vocabulary the row of each
    id (ignored targets stay `IGNORE_INDEX`)."""
    if model.config.vocab_rows is None:
        return targets
    rows = targets.clone()
    keep = targets != IGNORE_INDEX
    rows[keep] = token_rows(model, targets[keep])
    return rows


def causal_lm_loss(model: GptOss, inputs: Tensor, targets: Tensor, fused: bool = True) -> Tensor:
    """Summed cross-entropy of next-token `targets` (B, T) given `inputs` (B, T).

    Targets equal to `IGNORE_INDEX` are not learned (prompt tokens, padding). `fused`: the output
    head and the loss in chunks (`linear_cross_entropy`), reading the final hidden states and the
    head's weight, so the whole (tokens × vocab) logits never exist; otherwise the model's logits and
    `F.cross_entropy`. Under FSDP `model.hidden_states` must be registered as a forward method
    (`register_fsdp_forward_method`), so the root's parameters are gathered around it as around a
    forward, and stay gathered for the head's weight until backward.
    """
    if not fused:
        logits = model(inputs)
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    hidden = model.hidden_states(inputs).flatten(0, 1)
    return linear_cross_entropy(hidden, model.lm_head.weight, head_rows(model, targets).flatten())
