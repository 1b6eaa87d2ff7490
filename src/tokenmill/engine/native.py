"""The C++ kernels in csrc/, compiled for this machine at first use and cached; None where no compiler is found.

Built with the system's C++ compiler (`$CXX`, else g++ or c++), `-O3 -march=native -fopenmp` (the
attention kernels ~9 s on a 2-core Zen 4, the others under a second), into `<cache>/kernels/` under a
name keyed by the source, the flags and this CPU's model and features, so a cache shared between
machines never serves one CPU another's build. The library links `libgomp.so.1`, which torch's wheel
already loaded: the kernels share torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


_P, _N, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int  # pointer, size, threads

# each library's functions: name -> (argtypes, restype)
SIGNATURES: dict[str, dict[str, tuple[list, type | None]]] = {
    "paged_attention": {
        "paged_decode": ([_P, _N, _N] + [_P] * 5 + [_N, _P] + [_N] * 7 + [ctypes.c_float, _T], ctypes.c_int),
        "paged_prefill": ([_P, _N, _N, _P, _P, _P, _P, _N, _P] + [_N] * 5 + [ctypes.c_float, _T], ctypes.c_int),
        "paged_decode_f16": ([_P, _N, _N] + [_P] * 5 + [_N, _P] + [_N] * 7 + [ctypes.c_float, _T], ctypes.c_int),
        "paged_prefill_f16": ([_P, _N, _N, _P, _P, _P, _P, _N, _P] + [_N] * 5 + [ctypes.c_float, _T], ctypes.c_int),
    },
    "llama_ops": {
        "rope_store": ([_P] * 6 + [_N] * 8 + [_T], None),
        "rope_store_f16": ([_P] * 6 + [_N] * 8 + [_T], None),
        "add_rms_norm": ([_P] * 4 + [_N] * 2 + [ctypes.c_float, ctypes.c_int, _T], None),
        "small_matmul": ([_P] * 4 + [_N] * 3 + [_T], ctypes.c_int),
        "silu_mul": ([_P, _P, _N, _N, ctypes.c_int, _P, _T, _T], ctypes.c_int),
        "llama_layers": ([_P, _P], ctypes.c_int),
    },
    "matmul": {
        "matmul": ([_P] * 4 + [_N] * 3 + [_T], ctypes.c_int),
        "matmul_pack": ([_P] * 2 + [_N] * 2, None),
        "matmul_panel_width": ([], ctypes.c_int),
        "matmul_silu": ([_P] * 4 + [_N] * 3 + [_T, ctypes.c_int, _P, _T], ctypes.c_int),
        "matmul_stolen": ([], ctypes.c_int64),
        "screen_width": ([], ctypes.c_int),
        "screen_tiles": ([], ctypes.c_int),
        "screen_size": ([_N, _N, _P, _P], None),
        "screen_pack": ([_P] * 3 + [_N] * 2, None),
        "screened_logits": ([_P] * 6 + [_N] * 4 + [_T, ctypes.c_int], ctypes.c_int),
    },
}
# built only where the CPU converts IEEE half in hardware (F16C): a half KV pool elsewhere runs in torch ops
HALF = {"paged_decode_f16", "paged_prefill_f16", "rope_store_f16"}
# absent from a build of an older source (benchmarks.kernel_ab's A side): its callers fall back where it is missing
LATER = {"matmul_silu", "matmul_stolen", "screen_width", "screen_tiles", "screen_size", "screen_pack", "screened_logits"}
# -ffp-contract=off: no fused multiply-add, so every product and sum of the llama ops rounds as transformers' ops do
EXTRA_FLAGS = {"llama_ops": ["-ffp-contract=off"]}


def load_paged_attention(cache: Path) -> ctypes.CDLL | None:
    """The paged attention kernels' library (`paged_decode`, `paged_prefill` typed), or None: no compiler, or the build failed."""
    return load("paged_attention", cache)


def load_llama_ops(cache: Path) -> ctypes.CDLL | None:
    """The llama layer's compiled ops (`rope_store`, `add_rms_norm`, `small_matmul`, `silu_mul`, `llama_layers`), or None: no compiler, or a failed build."""
    return load("llama_ops", cache)


def load_matmul(cache: Path) -> ctypes.CDLL | None:
    """The batch-invariant matmul's library (`matmul`, `matmul_pack`, `matmul_panel_width` typed), or None: no compiler, or the build failed."""
    return load("matmul", cache)


def load(name: str, cache: Path, source: str | None = None) -> ctypes.CDLL | None:
    """Build library `name` from csrc/<name>.cpp, or from `source` (another version of it, for an A/B), or find it
    built, and load it with its functions typed; None on any failure."""
    if source is None:
        source = resources.files("tokenmill.engine").joinpath(f"csrc/{name}.cpp").read_text()
    library = _build(source, name, cache, EXTRA_FLAGS.get(name))
    if library is None:
        return None
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as exc:  # a truncated file, a runtime library missing
        log.warning("loading the %s kernel failed (%s): it runs in torch ops", name, exc)
        return None
    for function, (argtypes, restype) in SIGNATURES[name].items():
        if function in HALF | LATER and not hasattr(lib, function):
            continue
        getattr(lib, function).argtypes, getattr(lib, function).restype = argtypes, restype
    return lib


def _build(source: str, name: str, cache: Path, extra: list[str] | None = None) -> Path | None:
    """Compile source into cache/kernels (once per source, flags and CPU); its path, or None."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.info("no C++ compiler found: %s runs in torch ops (install g++ for the faster CPU kernels)", name)
        return None
    flags = FLAGS + (extra or [])
    key = hashlib.sha256("\0".join([source, compiler, *flags, _cpu()]).encode()).hexdigest()[:16]
    target = cache / "kernels" / f"{name}-{key}.so"
    if target.exists():
        return target
    try:
        return _compile(compiler, flags, source, name, target)
    except OSError as exc:  # a cache folder this user cannot write, a full disk: run without the kernel
        log.warning("building the %s kernel in %s failed (%s): it runs in torch ops", name, target.parent, exc)
        return None


def _compile(compiler: str, flags: list[str], source: str, name: str, target: Path) -> Path | None:
    """Compile source to target through a temporary folder beside it; None if the compiler refuses."""
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
        src.write_text(source)
        try:
            done = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            log.warning("compiling the %s kernel failed (%s): it runs in torch ops", name, exc)
            return None
        if done.returncode != 0:
            log.warning("compiling the %s kernel failed: it runs in torch ops\n%s", name, done.stderr[-2000:])
            return None
        os.replace(out, target)  # atomic: a server starting beside this one sees the whole file or none
    log.info("compiled the %s kernel in %.1f s: %s", name, time.monotonic() - started, target)
    return target


def _cpu() -> str:
    """This CPU's model and features, as -march=native sees them (empty where /proc/cpuinfo is absent)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
