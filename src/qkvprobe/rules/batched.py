"""Batched products of many small matrices (few-shot episodes, span-reduced problems).

Why not always ``torch.matmul``: on CPU, torch's batched GEMM is several times slower than numpy's ``matmul``
(OpenBLAS, one GEMM per matrix of the stack) for the skinny shapes of few-shot work; both are the same float32 /
float64 BLAS products, only the batching differs (``benchmarks/bench_rules.py kernels`` measures it).
Accelerators and autograd keep torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = (torch.float32, torch.float64)


def _blas_ready(t: Tensor) -> Tensor:
    # numpy hands a matrix to BLAS only when one of its two inner strides is 1; otherwise it loops in C.
    return t if t.stride(-1) == 1 or t.stride(-2) == 1 else t.contiguous()


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a [..., m, k] @ b [..., k, n]`` with ``torch.matmul``'s semantics (broadcast batch dimensions)."""
    if (
        a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dtype == b.dtype
        and a.dtype in _NUMPY_DTYPES
        and a.dim() >= 3
        and not (a.requires_grad or b.requires_grad)
    ):
        return torch.from_numpy(np.matmul(_blas_ready(a).numpy(), _blas_ready(b).numpy()))
    return torch.matmul(a, b)
