"""AqlmLoraLinear's memory: nothing saved without grad; with grad, nothing of size N x in_features
beyond the input itself."""

import pytest
import torch
from torch import nn

from tests.support.layers import IN_FEATURES, SCHEMES, dropout_layer, lora_layer


class _SavedTensors:
    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_nothing_saved_without_grad(context):
    layer = dropout_layer(0.3).train()
    x = torch.randn(8, IN_FEATURES, requires_grad=True)
    with context(), _SavedTensors() as tracker:
        out = layer(x)
        mixed = layer(x.unsqueeze(1), adapter_names=["a", "__base__"] * 4)
    assert out.grad_fn is None and mixed.grad_fn is None
    assert tracker.saved == []


def test_training_saves_no_activation_copies():
    layer = lora_layer(SCHEMES[0], "multi")
    for name in ("a", "b"):
        layer.lora_dropout[name] = nn.Dropout(0.3)
    layer.train()
    n_rows = 64
    x = torch.randn(n_rows, IN_FEATURES, requires_grad=True)
    base = layer.get_base_layer()
    allowed = {t.data_ptr() for t in (x, base.codes, base.codebooks, base.scales, base.bias)}
    with _SavedTensors() as tracker:
        out = layer(x)
    big = [tuple(t.shape) for t in tracker.saved if t.numel() >= n_rows * IN_FEATURES and t.data_ptr() not in allowed]
    assert (n_rows, 10) in [tuple(t.shape) for t in tracker.saved], "xa = dropout(x) @ A^T [N, r] was not saved"
    assert big == [], f"saved activation-sized tensors besides x: {big}"
    out.sum().backward()
    assert layer.lora_A["b"].weight.grad is not None
