"""BatchNorm folded into the layer before it: the one formula the compiler and the tools share.

    BN(x W + b) = x (W * s) + ((b - mean) * s + beta),   s = gamma / sqrt(var + eps)

per output channel. The chip holds the folded weight, so its quantisation scale and noise
are those of W * s. Written with arithmetic operators only, the formula runs unchanged on
numpy arrays (the compiler folds ONNX initializers in float64) and on torch tensors (the
tools fold modules in float32).
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor


def scale(gamma: Array, var: Array, eps: float) -> Array:
    """Per-channel factor s = gamma / sqrt(var + eps) that the folded weight is multiplied by."""
    return gamma / (var + eps) ** 0.5


def fold(weight: Array, bias: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float,
         axis: int = 0) -> tuple[Array, Array]:
    """(W * s, (b - mean) * s + beta): the weight and bias that compute BN(x W + b); ``axis`` of W is the channel."""
    s = scale(gamma, var, eps)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return weight * s.reshape(shape), (bias - mean) * s + beta
