"""A float32 CPU matmul with its weight packed once: x [T, in] -> [T, out], each row's bits the same whatever T is.

With the compiled kernel (csrc/matmul.cpp) every output is one fused multiply-add chain over the inputs in
order, so a lone sequence can run one row instead of a padded batch; measured on the 2-core Zen 3 with
SmolLM2's 30 layers, against oneDNN's packed GEMM (the fallback, also invariant): 1.9x at 1 row (the
weights stream at 18 GB/s of the machine's 20), 1.2-1.5x at 16, 1.1-1.25x at 64, even from 192 rows up.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.engine.host_memory import HugePageArena


class PackedLinear:
    """weight [out, in] (+ bias [out]) packed for `kernel` (the compiled matmul library), or for oneDNN where it is None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: Any = None, arena: HugePageArena | None = None):
        """arena: where the compiled kernel's panels go (2 MiB pages), or None: a buffer of their own."""
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        width = kernel.matmul_panel_width() if kernel is not None else 0
        self.kernel = kernel if width > 0 else None  # 0: this CPU has no vector FMA, oneDNN it is
        if width:
            self.packed = _pack(kernel, weight.detach().contiguous(), width, arena)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        if self.kernel is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        x = x.contiguous()
        out = x.new_empty(x.shape[0], self.out_features)
        self.kernel.matmul(
            x.data_ptr(), self.packed.data_ptr(), None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
            x.shape[0], self.out_features, self.in_features, torch.get_num_threads(),
        )  # fmt: skip
        return out


def _pack(kernel: Any, weight: torch.Tensor, width: int, arena: HugePageArena | None = None) -> torch.Tensor:
    """weight [N, K] -> panels [ceil(N / width), K, width] (zero columns past N), 64-byte aligned for the kernel's loads."""
    n, k = weight.shape
    size = -(-n // width) * k * width
    if arena is not None:
        packed = arena.take(size)
    else:
        buffer = torch.empty(size + 16)  # 16 floats of slack: the view below starts on a 64-byte boundary
        offset = (-buffer.data_ptr() // 4) % 16
        packed = buffer[offset : offset + size]
    kernel.matmul_pack(weight.data_ptr(), packed.data_ptr(), n, k)
    return packed


def unpack(packed: torch.Tensor, n: int, k: int, width: int) -> torch.Tensor:
    """_pack's inverse: the weight [n, k] back from panels [ceil(n / width), k, width] (a benchmark repacks it for another build)."""
    panels = -(-n // width)
    return packed.view(panels, k, width).transpose(1, 2).reshape(panels * width, k)[:n].contiguous()
