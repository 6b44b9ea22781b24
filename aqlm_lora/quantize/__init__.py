"""A small data-free AQLM quantizer.

Dense ``nn.Linear`` -> ``aqlm.QuantizedLinear``: residual k-means, then alternating refinement.

A small, data-free AQLM quantizer (it fits the weights, not the layer outputs): good enough to make
real AQLM checkpoints of small models for tests, demos and benchmarks, in seconds on a CPU.

For a weight ``W [out, in]`` and a scheme ``CxB g<ig> o<og>``:

1. scales: one per output group of ``og`` rows, the RMS of that group (``[out/og, 1, 1, 1]``);
2. the scaled weight ``X = W / scale`` is cut into ``og x ig`` groups (vectors of ``og*ig`` numbers);
3. codebook ``c`` is fitted by (weighted) k-means to the residual ``X - sum_{c' < c} cb_c'[code_c']``
   (k-means++ init for codebooks of up to 1024 entries, a random sample of the groups above),
   and code ``c`` is the residual's nearest entry;
4. ``rounds`` rounds of exact block-coordinate descent on ``||W - W_q||_F``: for each codebook,
   re-assign its codes given the others (nearest neighbour; optionally a joint beam search over all
   codebooks first) and refit its entries as the weighted mean residual of their groups; then refit
   every scale by least squares. Each step minimises the true error over its block, so the relative
   error ``||W - W_q||_F / ||W||_F`` never increases from round to round (it is returned per round).

Distances are computed in chunks of rows, so 65536-entry codebooks need only a few MiB at a time.

Weights it refuses or handles: a weight that is empty or holds NaN/Inf raises ``ValueError`` (naming
the layer in :func:`quantize_model`). Any finite magnitude works: the weight is first divided by one
power of two per layer (so its largest entry lies in [0.5, 1), done in float64, exact for normal
numbers) and the factor is folded back into the scales at the end; squared norms can neither
underflow (``1e-30 * W``) nor overflow (``1e20 * W``), and ``W * 2**k`` gives the same codes and
codebooks as ``W``. The only refusal for size is at the end: scales that the output dtype cannot
hold (``inf``, or 0 for a row that is not zero, e.g. ``1e20 * W`` with ``dtype=torch.float16``).
Codes are stored the AQLM way: ``[out/og, in/ig, C]``, int8 for ``nbits <= 8`` else int16, signed
(a value ``v >= 2**(nbits-1)`` is stored as ``v - 2**nbits``).
"""

from ..scheme import SCHEME_GRAMMAR, Scheme, pack_codes, parse_scheme, unpack_codes
from .clustering import kmeans, nearest
from .model import layer_scheme, mean_errors, quantize_model
from .weight import QuantizedWeight, check_weight, quantize_linear, quantize_weight

__all__ = [
    "SCHEME_GRAMMAR",
    "Scheme",
    "parse_scheme",
    "pack_codes",
    "unpack_codes",
    "kmeans",
    "nearest",
    "QuantizedWeight",
    "check_weight",
    "quantize_weight",
    "quantize_linear",
    "quantize_model",
    "layer_scheme",
    "mean_errors",
]
