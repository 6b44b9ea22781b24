"""Codebook tuning: fit the codebooks and scales of AQLM layers to a teacher model's outputs.

Re-quantizing a merged weight fits ``||W' - W_q||`` and treats every direction alike, while the
adapter changed the weight in a few directions that matter for the data. With calibration text,
:func:`tune_codebooks` then distils the teacher (the model with its adapters, unmerged) into the
re-quantized model: the codes stay fixed, the codebooks and scales of the given layers are trained
with Adam on ``KL(teacher || model)`` of the next-token distributions, everything else frozen.
This is AQLM's own end-to-end fine-tuning of codebooks and scales, with the adapter's model as the
target.

While tuning, each tuned layer computes with its weight dequantized by plain differentiable PyTorch
(:func:`aqlm_lora.reference.dequantize_as`: the fused ops do not differentiate with respect to
codebooks or scales). Autograd keeps every tuned layer's dense weight and the tensors it was built
from (about 3x the layer's float32 size) until the step's backward, so a step holds about 3x the
tuned layers' dense float32 size. Afterwards the layers are back as they were, with their new
codebooks and scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reference import dequantize_as
from .fused_base import canonical_codes

__all__ = ["teacher_log_probs", "tune_codebooks"]


class _DifferentiableForward:
    """The forward installed on a layer while it is tuned: ``x W^T + b`` with ``W`` dequantized by autograd."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.codes = canonical_codes(layer)

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer
        weight = dequantize_as(self.codes, layer.codebooks, layer.scales, torch.float32)
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), weight, bias).to(x.dtype)


@torch.no_grad()
def teacher_log_probs(model: nn.Module, windows: Tensor, batch: int = 8) -> Tensor:
    """The teacher's next-token log-probabilities on ``windows`` ``[N, T]`` (``[N, T, vocab]``, float32)."""
    was_training = model.training
    model.eval()
    try:
        parts = [
            torch.log_softmax(model(input_ids=windows[i : i + batch]).logits.float(), dim=-1)
            for i in range(0, windows.shape[0], batch)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def tune_codebooks(
    model: nn.Module,
    layers: list[nn.Module],
    windows: Tensor,
    targets: Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    batch: int = 8,
    seed: int = 0,
) -> list[float]:
    """Train the codebooks and scales of ``layers`` (``aqlm.QuantizedLinear`` of ``model``) so that
    ``model`` on ``windows`` ``[N, T]`` matches the teacher's log-probabilities ``targets``
    ``[N, T, vocab]`` (:func:`teacher_log_probs`); returns the loss of each step.

    ``steps`` Adam steps of ``batch`` windows drawn with ``seed``. The model's other parameters are
    frozen meanwhile and get their ``requires_grad`` back afterwards; the tuned tensors end frozen.
    """
    if windows.shape[:2] != targets.shape[:2]:
        raise ValueError(f"windows {list(windows.shape)} and targets {list(targets.shape)} do not match")
    tuned = [t for layer in layers for t in (layer.codebooks, layer.scales)]
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    saved = [(layer, vars(layer).get("forward")) for layer in layers]
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    was_training = model.training
    try:
        model.requires_grad_(False)
        for layer in layers:
            layer.forward = _DifferentiableForward(layer)
        for t in tuned:
            t.requires_grad_(True)
        optimizer = torch.optim.Adam(tuned, lr=lr)
        model.eval()  # no dropout: the student should match the teacher's eval outputs
        for _ in range(steps):
            pick = torch.randint(windows.shape[0], (min(batch, windows.shape[0]),), generator=generator)
            logits = model(input_ids=windows[pick]).logits
            log_p = torch.log_softmax(logits.float(), dim=-1)
            loss = F.kl_div(log_p.flatten(0, -2), targets[pick].flatten(0, -2), log_target=True, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for layer, forward in saved:
            if forward is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = forward
        for t in tuned:
            t.requires_grad_(False)
            t.grad = None
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), False))
        model.train(was_training)
    return losses
