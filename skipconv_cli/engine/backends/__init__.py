"""Execution backends of :class:`~skipconv_cli.engine.skip_conv.SkipConv2d`.

- ``"reference"``: the readable path in ``skip_conv.py``: ``z += W * delta`` computed densely. Supports
  everything (training, Gumbel gates with gradients, the lossy ``reference="previous"``) and is what the
  tests compare against.
- ``"sparse"``: ``sparse.py``: recomputes ``z = W * x_ref`` only on the output tiles that can change,
  gathered from the reference input and run as one batched convolution (one C++ call per layer on the
  CPU), with measured per-layer dense fallbacks: plain layers and back-off. Inference only; the layer
  falls back to the reference path when gradients are needed.
"""

BACKENDS = ("reference", "sparse")

__all__ = ["BACKENDS"]
