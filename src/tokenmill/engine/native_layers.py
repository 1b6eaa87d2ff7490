"""Every decoder layer of a step in one compiled call (csrc/llama_ops.cpp's `llama_layers`).

`LlamaForward`'s Python loop makes ~15 calls a layer around its kernels (ctypes conversions, views,
allocations, torch's silu and mul); at one sequence that was ~3.4 ms of a 26 ms SmolLM2 step, with the
second thread idle throughout. `NativeLayers` hands the same kernels, in the same order and on the same
buffers' bits, to one C loop: the forward's numbers do not change (tests/test_native_layers.py). It
runs only where every part has a compiled kernel that gives the Python loop's bits: the packed
matmul, the compiled norm, RoPE and silu, and both attention kernels for this head size. Where the matmul's
`matmul_silu` gives the same bits (checked on the model's own weight at build), the gate/up projection
and silu run as one pass.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.engine.attention import StepContext, kernels_take, prefill_tables

_P, _N, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32

WEIGHTS = ("norm1", "qkv", "qkv_bias", "o", "o_bias", "norm2", "gate_up", "gate_up_bias", "down", "down_bias")
PLAIN = ("qkv_plain", "o_plain", "gate_up_plain", "down_plain")  # the unpacked weights, for small_matmul
BUFFERS = ("delta", "normed", "qkv", "attn", "projected", "gate_up", "act")


class LayerWeights(ctypes.Structure):
    _fields_ = [(name, _P) for name in WEIGHTS + PLAIN]


class Model(ctypes.Structure):
    _fields_ = [
        *[(name, _N) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter")],
        ("eps", _F), ("scaling", _F), ("norm_lanes", _I), ("silu_lanes", _I), ("small_rows", _I),
        ("weights", ctypes.POINTER(LayerWeights)), ("matmul", _P), ("decode", _P), ("prefill", _P), ("exp", _P), ("matmul_silu", _P),
    ]  # fmt: skip


class Step(ctypes.Structure):
    _fields_ = [
        *[(name, _N) for name in ("rows", "decode_rows", "table_width", "chunks", "attended")],
        ("kv", _P), ("num_blocks", _N), ("block_size", _N), ("x", _P),
        *[(name, _P) for name in BUFFERS],
        *[(name, _P) for name in ("cos", "sin", "slots", "tables", "lens", "chunk_meta", "chunk_tables")],
        ("threads", _I), ("torch_threads", _I), ("keep", _P), ("kept", _N), ("kv_half", _I),
    ]  # fmt: skip


def torch_exp() -> tuple[int, int]:
    """(lanes, address) of the vector exp torch's float ops call on this CPU (Sleef's, in libtorch_cpu); (0, 0): none found."""
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)
    if not lanes:
        return 0, 0
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lanes, ctypes.cast(getattr(library, f"Sleef_expf{lanes}_u10"), ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0, 0


def silu_lanes(kernel: Any) -> tuple[int, int]:
    """(lanes, exp address) at which the compiled silu_mul gives torch's F.silu(g).mul_(u) bits here; (0, 0): it does not."""
    lanes, exp = torch_exp()
    if not lanes:
        return 0, 0
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    for rows, width in ((1, 64), (3, 37), (33, 1000), (100, 1536)):  # ranges split inside rows, scalar tails
        gate_up = torch.randn(rows, 2 * width, generator=gen) * 6
        got = torch.empty(rows, width)
        if kernel.silu_mul(gate_up.data_ptr(), got.data_ptr(), rows, width, lanes, exp, threads, threads) != 0:
            return 0, 0
        if not torch.equal(got, F.silu(gate_up[:, :width]).mul_(gate_up[:, width:])):
            return 0, 0
    return lanes, exp


def fused_silu(gate_up: Any, lanes: int, exp: int) -> bool:
    """Whether the compiled matmul_silu gives the bits of gate_up's packed matmul (its halves) then torch's silu(gate) * up,
    at this model's own gate/up weight and at row counts that split torch's ranges."""
    packed, inter, hidden, half = gate_up.packed, gate_up.out_features // 2, gate_up.in_features, gate_up.width // 2
    if not gate_up.halves:
        return False
    kernel, threads = gate_up.kernel, torch.get_num_threads()
    if not hasattr(kernel, "matmul_silu") or kernel.matmul_silu(0, 0, 0, 0, 0, inter, hidden, threads, lanes, exp, threads) != 0:
        return False
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 7, 16, 45):
        x = torch.randn(rows, hidden, generator=gen)
        want = gate_up(x)
        want = F.silu(want[:, :inter]).mul_(want[:, half : half + inter])
        got = torch.empty(rows, inter)
        bias = 0 if gate_up.bias is None else gate_up.bias.data_ptr()
        if kernel.matmul_silu(x.data_ptr(), packed.data_ptr(), bias, got.data_ptr(), rows, inter, hidden, threads, lanes, exp, threads) != 0:
            return False
        if not torch.equal(got, want):
            return False
    return True


class NativeLayers:
    """A LlamaForward's layers as one `llama_layers` call; build() gives None where a part has no compiled kernel."""

    def __init__(self, forward: Any, attention: Any, lanes: int, exp: int, small_rows: int, kv_half: bool = False):
        """forward: the LlamaForward (its layers hold the packed weights); attention: the paged attention library;
        lanes/exp: silu_mul's (silu_lanes); small_rows: steps of at most this many rows take small_matmul where the layers have it;
        kv_half: the pool holds float16 (the _f16 attention kernels and K/V write)."""
        self.kernel = forward.kernel  # llama_ops: llama_layers and the norm, RoPE and silu kernels it calls
        self.matmul = forward.layers[0].qkv.packed.kernel
        self.attention = attention
        self.kv_half = kv_half
        self.suffix = "_f16" if kv_half else ""  # of the attention kernels' names
        first = forward.layers[0]
        self.weights = (LayerWeights * len(forward.layers))(*[LayerWeights(*_pointers(layer)) for layer in forward.layers])
        d, hidden, inter = first.head_dim, first.norm1.weight.shape[0], first.gate_up.packed.out_features // 2
        # each buffer's width (BUFFERS)
        self.widths = {"delta": hidden, "normed": hidden, "qkv": sum(first.widths), "attn": first.heads * d, "projected": hidden}
        self.widths.update(gate_up=first.gate_up.packed.width, act=inter)
        self.model = Model(
            len(forward.layers), hidden, first.heads, first.widths[1] // d, d, inter,
            first.norm1.eps, first.scaling, forward.norm_lanes, lanes, small_rows if first.qkv.small is not None else 0, self.weights, 0, 0, 0, exp, 0,
        )  # fmt: skip
        # the MLP's projection and activation in one pass where the matmul library's matmul_silu gives their bits
        self.fused = fused_silu(first.gate_up.packed, lanes, exp)
        self._buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def build(forward: Any, attention: Any, small_rows: int, kv_dtype: torch.dtype = torch.float32) -> NativeLayers | None:
        """The native loop for this forward and attention library, or None where any part would take another path."""
        if forward.kernel is None or not forward.norm_lanes or not hasattr(forward.kernel, "llama_layers"):
            return None
        kv_half = kv_dtype == torch.float16
        if kv_dtype != torch.float32 and not (kv_half and forward.layers[0].store is not None and hasattr(attention, "paged_decode_f16")):
            return None  # a pool the compiled kernels do not read
        first = forward.layers[0]
        projections = [p for layer in forward.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if any(p.packed is None or p.packed.kernel is None for p in projections):
            return None  # oneDNN packs the weights
        if len({p.small is None for p in projections}) != 1:
            return None  # small_matmul for some projections only
        d, heads = first.head_dim, first.heads
        if first.widths[1] != first.widths[2] or first.widths[1] % d or heads % (first.widths[1] // d):
            return None
        if not kernels_take(attention.paged_decode, attention.paged_prefill, heads, first.widths[1] // d, d):
            return None
        lanes, exp = silu_lanes(forward.kernel)
        if not lanes:
            return None
        layers = NativeLayers(forward, attention, lanes, exp, small_rows, kv_half)
        gate_up = first.gate_up.packed
        if gate_up.width != gate_up.out_features and (not layers.fused or (layers.model.small_rows and gate_up.bias is not None)):
            # gate and up padded apart, which only matmul_silu reads: llama_layers' own pass, and small_matmul's steps with
            # the padded bias, take them whole
            return None
        return layers

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: StepContext, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] the embedded step, updated in place; cos/sin [T, 1, D]; keep [K] the rows whose logits are wanted
        -> (x, the last layer's output) at those rows, [K, hidden] each."""
        t = x.shape[0]
        # strictly increasing (no padding repeats): the last layer's projection and MLP then run on these rows only
        trim = keep.shape[0] < t and bool((keep[1:] > keep[:-1]).all())
        buffers = {name: self._take(name, t) for name in BUFFERS}
        decode = step.decode_rows
        tables = step.decode_blocks if decode else None
        lens = step.decode_lens if decode else None
        meta, chunk_tables = prefill_tables(step.chunks) if step.chunks else (None, None)
        attended = step.chunks[-1].rows.stop if step.chunks else decode
        kv = step.kv
        threads = torch.get_num_threads()
        args = Step(
            t, decode, 0 if tables is None else tables.shape[1], len(step.chunks), attended, kv.data_ptr(), kv.shape[3], kv.shape[4], x.data_ptr(),
            *[buffers[name].data_ptr() for name in BUFFERS], cos.data_ptr(), sin.data_ptr(), step.slots.data_ptr(),
            *[0 if a is None else a.data_ptr() for a in (tables, lens, meta, chunk_tables)], threads, threads,
            keep.data_ptr() if trim else 0, keep.shape[0], self.kv_half,
        )  # fmt: skip
        # looked up at each call, not kept: benchmarks.kernel_ab swaps the libraries between calls
        self.model.matmul, self.model.decode = _address(self.matmul.matmul), _address(getattr(self.attention, "paged_decode" + self.suffix))
        self.model.prefill = _address(getattr(self.attention, "paged_prefill" + self.suffix))
        self.model.matmul_silu = _address(self.matmul.matmul_silu) if self.fused else 0
        done = self.kernel.llama_layers(ctypes.byref(self.model), ctypes.byref(args))
        if done != 0:
            raise RuntimeError(f"llama_layers: a kernel refused the step ({done})")
        step.kv_written = True
        if trim:
            return x[: keep.shape[0]], buffers["delta"][: keep.shape[0]]
        return x[keep], buffers["delta"][keep]

    def _take(self, name: str, rows: int) -> torch.Tensor:
        """Buffer `name`'s first `rows` rows, kept from step to step (fresh memory costs a page fault per 4 KiB each time)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = torch.empty(rows, self.widths[name])
        return buffer[:rows]


def _pointers(layer: Any) -> list[int | None]:
    """A Layer's weights in LayerWeights' order (None: no bias; no plain weight where small_matmul is not used)."""
    out: list[int | None] = []
    for part in (layer.norm1, layer.qkv, layer.o, layer.norm2, layer.gate_up, layer.down):
        if hasattr(part, "eps"):  # a norm: its weight only
            out.append(part.weight.data_ptr())
        else:
            out += [part.packed.packed.data_ptr(), None if part.packed.bias is None else part.packed.bias.data_ptr()]
    return out + [None if p.small is None else p.weight.data_ptr() for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]


def _address(function: Any) -> int:
    """A ctypes function's address."""
    return ctypes.cast(function, ctypes.c_void_p).value or 0
