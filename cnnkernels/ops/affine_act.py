"""affine_act: y = act(x * scale[c] + shift[c] (+ residual)), per channel (dim 1), in one pass.

BatchNorm's elementwise pass with the statistics folded into `scale` and `shift` (inference, or
re-applying batch statistics computed earlier, as the shared-memory DenseNet does in backward),
fused with an activation from cnnkernels.activations; `residual` (x's shape and dtype) is added
before the activation, as ResNet's `bn → +identity → relu`. `scale` and `shift` are in the compute type
(float32 for float32/float16/bfloat16 inputs, float64 for float64). `out=` writes into an existing
tensor of x's shape and dtype (it may be x itself). No autograd: it raises when asked for
gradients. Kernels: csrc/cpu and csrc/cuda/affine_act_kernel.*, cnnkernels/triton/affine_act.py;
reference: cnnkernels/reference.
"""
from __future__ import annotations

import torch

from .. import _extension, activations, backend
from ..reference import affine_act as reference

_OP = "affine_act"
KERNELS = frozenset({"cpu", "cuda", "triton"})
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x, scale, shift, out, residual=None) -> None:
    optional = tuple((name, t) for name, t in (("out", out), ("residual", residual)) if t is not None)
    for name, t in (("x", x), ("scale", scale), ("shift", shift)) + optional:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: expected argument '{name}' to be a torch.Tensor, got "
                            f"{type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: expected argument 'x' to be a float32, float16, bfloat16 or float64 "
                        f"tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{_OP}: expected argument 'x' to have a channel dimension ([N, C, ...]), "
                         f"got shape {tuple(x.shape)}")
    want = _compute_dtype(x.dtype)
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dim() != 1 or t.shape[0] != x.shape[1]:
            raise ValueError(f"{_OP}: expected argument '{name}' to have shape [{x.shape[1]}] (one "
                             f"value per channel of x), got {tuple(t.shape)}")
        if t.dtype != want:
            raise TypeError(f"{_OP}: expected argument '{name}' to be {want} (the compute type of "
                            f"{x.dtype} x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{_OP}: argument '{name}' is on {t.device} but 'x' is on {x.device}")
    for name, t in optional:
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{_OP}: '{name}' must have x's shape, dtype and device "
                             f"({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"({tuple(t.shape)}, {t.dtype}, {t.device})")


def affine_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               activation: str = "identity", negative_slope: float = 0.01, *,
               residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    _check(x, scale, shift, out, residual)
    code = activations.activation_code(activation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, scale, shift, residual)):
        raise RuntimeError(f"{_OP}: has no autograd (it is an inference / recomputation pass); "
                           "call it under torch.no_grad()")
    kind = backend.select(x.device, KERNELS, _OP)
    if kind == "triton":
        from ..triton import affine_act as _triton  # noqa: F401  (lazy: registers the op)

        y = torch.ops.cnnkernels.affine_act_triton(x, scale, shift, code, float(negative_slope),
                                                   residual)
        return y if out is None else out.copy_(y)
    if kind == "torch" or (kind == "cuda" and not _extension.cuda_ext) or not _extension.cpu_ext:
        y = reference.affine_act(x, scale, shift, code, float(negative_slope), residual)
        return y if out is None else out.copy_(y)
    if out is None:
        return torch.ops.cnnkernels.affine_act(x, scale, shift, code, float(negative_slope), residual)
    torch.ops.cnnkernels.affine_act_out(out, x, scale, shift, code, float(negative_slope), residual)
    return out


if _extension.cpu_ext:

    @torch.library.register_fake("cnnkernels::affine_act")
    def _affine_act_fake(x, scale, shift, activation=0, negative_slope=0.01, residual=None):
        return torch.empty_like(x)

    @torch.library.register_fake("cnnkernels::affine_act_out")
    def _affine_act_out_fake(out, x, scale, shift, activation=0, negative_slope=0.01, residual=None):
        return None
