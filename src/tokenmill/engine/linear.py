"""A float32 CPU matmul with its weight packed once: x [T, in] -> [T, out], each row's bits the same whatever T is.

With the compiled kernel (csrc/matmul.cpp) every output is one fused multiply-add chain over the inputs in
order, so a lone sequence can run one row instead of a padded batch; measured on the 2-core Zen 3 with
SmolLM2's 30 layers, against oneDNN's packed GEMM (the fallback, also invariant): 1.9x at 1 row (the
weights stream at 18 GB/s of the machine's 20), 1.2-1.5x at 16, 1.1-1.25x at 64, even from 192 rows up.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from tokenmill.engine.host_memory import HugePageArena


class PackedLinear:
    """weight [out, in] (+ bias [out]) packed for `kernel` (the compiled matmul library), or for oneDNN where it is None.

    halves: the weight is two halves (the MLP's gate and up), each packed into whole panels of its own, so that the
    compiled matmul_silu finds gate panel p and its up panel at the same place in each half; the kernel's output then
    has `width` columns, the gate at [0, out / 2) and the up at [width / 2, width / 2 + out / 2) (the two coincide
    with a plain packing where a half is whole panels).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: Any = None, arena: HugePageArena | None = None, halves: bool = False):
        """arena: where the compiled kernel's panels go (2 MiB pages), or None: a buffer of their own."""
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        panel = kernel.matmul_panel_width() if kernel is not None else 0
        self.kernel = kernel if panel > 0 else None  # 0: this CPU has no vector FMA, oneDNN it is
        self.halves = halves and panel > 0
        self.width = 2 * -(-self.out_features // 2 // panel) * panel if self.halves else self.out_features  # columns the kernel writes
        if self.halves and self.bias is not None and self.width != self.out_features:  # zeros under the padding columns
            self.bias = torch.cat([part for half in self.bias.chunk(2) for part in (half, half.new_zeros(self.width // 2 - half.shape[0]))])
        if panel:
            self.packed = _pack(kernel, weight.detach().contiguous(), panel, arena, self.halves)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, width] (width = out but for halves: see the class)."""
        if self.kernel is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        x = x.contiguous()
        out = x.new_empty(x.shape[0], self.width)
        self.kernel.matmul(
            x.data_ptr(), self.packed.data_ptr(), None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
            x.shape[0], self.width, self.in_features, torch.get_num_threads(),
        )  # fmt: skip
        return out


class ArgmaxScreen:
    """A packed lm_head's bfloat16 screen (csrc/matmul.cpp's screened_logits): for rows read only for their first argmax,
    the exact logits (head's bits) of the columns that can be it and -inf elsewhere, so the argmax is the head's.

    kernel: the compiled matmul library the head is packed for; tiles: run in AMX tiles (else in AVX512-BF16 vectors,
    slower than the head itself). Holds the weight as bfloat16 (half its bytes again) and each column's norm.
    """

    def __init__(self, weight: torch.Tensor, head: PackedLinear, kernel: Any, tiles: bool):
        self.head, self.kernel, self.tiles = head, kernel, tiles
        n, k = weight.shape
        elements, norms = ctypes.c_int64(), ctypes.c_int64()
        kernel.screen_size(n, k, ctypes.byref(elements), ctypes.byref(norms))
        buffer = torch.empty(elements.value + 32, dtype=torch.int16)  # 32 of slack: the view starts on a 64-byte boundary
        offset = (-buffer.data_ptr() // 2) % 32
        self.screen = buffer[offset : offset + elements.value]
        self.norms = torch.empty(norms.value)
        kernel.screen_pack(weight.detach().contiguous().data_ptr(), self.screen.data_ptr(), self.norms.data_ptr(), n, k)

    def __call__(self, x: torch.Tensor, limit: int) -> tuple[torch.Tensor, list[int]]:
        """x [R, in] -> (logits [R, out]: exact where a column below `limit` can be the row's argmax, else -inf;
        the rows the screen could not settle, whose logits the caller computes with the head)."""
        x = x.contiguous()
        out = x.new_empty(x.shape[0], self.head.out_features)
        fallback = torch.zeros(x.shape[0], dtype=torch.uint8)
        self.kernel.screened_logits(
            x.data_ptr(), self.screen.data_ptr(), self.norms.data_ptr(), self.head.packed.data_ptr(), out.data_ptr(), fallback.data_ptr(),
            x.shape[0], self.head.out_features, self.head.in_features, limit, torch.get_num_threads(), int(self.tiles),
        )  # fmt: skip
        return out, fallback.nonzero()[:, 0].tolist()


def _pack(kernel: Any, weight: torch.Tensor, width: int, arena: HugePageArena | None = None, halves: bool = False) -> torch.Tensor:
    """weight [N, K] -> panels [ceil(N / width), K, width] (zero columns past N), or each half's panels in turn (halves),
    64-byte aligned for the kernel's loads."""
    n, k = weight.shape
    parts = weight.chunk(2) if halves else (weight,)
    panels = [-(-part.shape[0] // width) for part in parts]
    size = sum(panels) * k * width
    if arena is not None:
        packed = arena.take(size)
    else:
        buffer = torch.empty(size + 16)  # 16 floats of slack: the view below starts on a 64-byte boundary
        offset = (-buffer.data_ptr() // 4) % 16
        packed = buffer[offset : offset + size]
    start = 0
    for part, count in zip(parts, panels, strict=True):
        kernel.matmul_pack(part.contiguous().data_ptr(), packed[start:].data_ptr(), part.shape[0], k)
        start += count * k * width
    return packed


def unpack(packed: torch.Tensor, n: int, k: int, width: int, halves: bool = False) -> torch.Tensor:
    """_pack's inverse: the weight [n, k] back from its panels (a benchmark repacks it for another build)."""
    if halves:
        size = packed.numel() // 2
        return torch.cat([unpack(packed[i * size : (i + 1) * size], n // 2, k, width) for i in (0, 1)])
    panels = -(-n // width)
    return packed.view(panels, k, width).transpose(1, 2).reshape(panels * width, k)[:n].contiguous()
