"""Additive weight fingerprint: prove bitwise equality of sharded weights without gathering them.

For a tensor flattened to x_0..x_{N-1}, let b_i be the raw bit pattern of x_i read as an unsigned integer of the
element's width (8/16/32/64 bits) and w_i = ((i + 1) * 0x9E3779B1) mod 2^32. The fingerprint is the int64 pair

    F = (sum_i w_i * b_i mod 2^64, sum_i b_i mod 2^64)        (two's complement wrap)

Why this shape: F is a sum over positions, so each rank fingerprints only its own contiguous shard (at its global
offset) and an all-reduce SUM in int64 (which wraps mod 2^64) yields exactly the fingerprint of the whole tensor,
whatever the split. The weights are distinct and non-zero for i < 2^32 - 1 (the multiplier is odd). Changing one
element by d changes F by (w_i * d, d) and swapping two different elements changes it by ((b_i - b_j)(w_j - w_i), 0)
(mod 2^64), so a change goes unseen only if that product is = 0 mod 2^64:

- 8/16/32-bit dtypes: both factors are non-zero with |factor| < 2^32, so |product| < 2^64 and it cannot vanish:
  every single-element change alters both components, every swap of different values alters the first.
- 64-bit dtypes: any single-element change still alters the second component. The first component misses a change
  (or a swap) only when the 2-adic valuations of the two factors add up to >= 64, e.g. values differing by a
  multiple of 2^(64 - v(i - j)) swapped at distance i - j; adjacent swaps are always caught.

Several simultaneous changes can cancel (F is linear in the b_i): this is an integrity check against bugs (wrong
shard, stale buffer, lossy cast), not a cryptographic hash. All arithmetic is int64 with wraparound; no floats.

The same pass counts non-finite elements (`fingerprint_scan`: a third int64, additive like F): an element of a float
dtype whose exponent bits are all set is inf or NaN, so a finiteness scan of every weight costs one compare and add
per element in cache (+6% bf16, +11% fp32 measured on the kernel), not a second read of the weights.

On CPU, F is computed by a small C kernel (one pass reading each element once, w_i in wrapping 32-bit arithmetic,
unsigned 64-bit accumulators), compiled with the system C compiler at a process's first CPU fingerprint unless the
build is cached on disk under torch's extension directory (0.1-0.8 s measured when it is not). Without a compiler, or
if the build fails (one warning per process), or with DPO_DIST_FINGERPRINT_KERNEL=0, the eager-torch path runs
instead: same results, ~10x slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from dpo_dist.compat.deepspeed import partition_range
from dpo_dist.verify.fingerprint_kernel import SOURCE as _KERNEL_SOURCE

MULT = 0x9E3779B1
_MASK32 = 0xFFFFFFFF
# CPU: elements per step. Steps of 2^18 keep the int64 work buffers (2 MiB each) in cache; measured on a 2-core EPYC,
# 50M bf16 elements, one thread: 2^16 50 ms, 2^17 43 ms, 2^18 40 ms, 2^20 48-52 ms; every tensor of a 0.44B model,
# two threads: 2^18 0.26 s, 2^20 1.1 s.
_CPU_STEP = 1 << 18


# Element width in bytes -> (integer view dtype, mask that makes its value the unsigned bit pattern, or None).
_VIEWS: dict[int, tuple[torch.dtype, int | None]] = {
    1: (torch.uint8, None),
    2: (torch.int16, 0xFFFF),
    4: (torch.int32, _MASK32),
    8: (torch.int64, None),
}
# CPU: unsigned views, whose conversion to int64 zero-extends (the bit pattern itself, no mask pass needed).
_UNSIGNED_VIEWS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.int64}

# The exponent field of each float dtype: an element whose exponent bits are all set is inf or NaN (IEEE 754 and
# bfloat16 alike). Counted in the fingerprint's own pass, so a finiteness scan of every weight costs no extra read.
# float8 formats encode NaN otherwise and are not scanned (mask 0, like integers).
EXPONENT_MASKS: dict[torch.dtype, int] = {
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
}

# Weights w_k for positions k = 0..n-1 (offset 0), one growing tensor per device; read-only and shared by all calls.
_BASE: dict[torch.device, torch.Tensor] = {}


def _base_weights(n: int, device: torch.device) -> torch.Tensor:
    """Cached ((k + 1) * MULT) mod 2^32 for k < n, so each chunk only needs an add and a mask."""
    base = _BASE.get(device)
    if base is None or base.numel() < n:
        base = torch.arange(1, n + 1, dtype=torch.int64, device=device).mul_(MULT).bitwise_and_(_MASK32)
        _BASE[device] = base
    return base[:n]


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of the flat elements rank ``rank`` owns under ZeRO-3's padded equal-size partitioning."""
    if world < 1 or not 0 <= rank < world or numel < 0:
        raise ValueError(f"bad shard request: numel={numel} rank={rank} world={world}")
    return partition_range(numel, -(-numel // world), rank)


def fingerprint_flat(flat: torch.Tensor, offset: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """Fingerprint of a 1-D slice holding global positions [offset, offset + numel) of some flattened tensor: int64
    [2] on flat's device. `fingerprint_scan` gives the same plus the count of non-finite elements."""
    return fingerprint_scan(flat, offset, chunk)[:2]


def fingerprint_scan(flat: torch.Tensor, offset: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """int64 [3]: the fingerprint of a 1-D slice at global positions [offset, offset + numel) and the number of its
    elements that are inf or NaN (0 for integer dtypes), counted in the same pass; additive over slices like F.

    Runs on flat's device and returns int64 [3] there (no host sync). Works ``chunk`` elements at a time (at most
    2^18 on CPU, for cache locality): extra memory is 2 int64 buffers of that size plus the cached weights; the
    input is never copied as a whole nor converted to float.
    """
    if flat.dim() != 1:
        raise ValueError(f"fingerprint_flat expects a 1-D tensor, got shape {tuple(flat.shape)}")
    if offset < 0 or chunk < 1:
        raise ValueError(f"bad offset={offset} or chunk={chunk}")
    device = flat.device
    numel = flat.numel()
    if numel == 0:
        return torch.zeros(3, dtype=torch.int64, device=device)
    size = flat.element_size()
    if size not in _VIEWS or flat.is_complex():
        raise TypeError(f"unsupported dtype for fingerprinting: {flat.dtype}")
    em = EXPONENT_MASKS.get(flat.dtype, 0)
    if device.type == "cpu":
        return _fingerprint_cpu(flat.view(_UNSIGNED_VIEWS[size]), offset, min(chunk, numel, _CPU_STEP), em)
    view_dtype, mask = _VIEWS[size]
    bits = flat.view(view_dtype)  # reinterpret, no copy (same element size works for any stride)
    step = min(chunk, numel)
    base = _base_weights(step, device)
    wbuf = torch.empty(step, dtype=torch.int64, device=device)
    bbuf = None if view_dtype == torch.int64 else torch.empty(step, dtype=torch.int64, device=device)
    # Mixed-dtype ops cast inside the kernel on GPUs (one pass instead of copy + mask).
    mask_t = None if mask is None else torch.full((1,), mask, dtype=torch.int64, device=device)
    starts = range(0, numel, step)
    partial = torch.zeros(len(starts), 3, dtype=torch.int64, device=device)  # summed once at the end
    for j, start in enumerate(starts):
        n = min(step, numel - start)
        src = bits[start : start + n]
        if bbuf is None:
            b = src  # 64-bit: the int64 value already is the pattern mod 2^64
        elif mask_t is not None:
            b = torch.bitwise_and(src, mask_t, out=bbuf[:n])  # sign-extended to int64, then masked
        else:
            b = bbuf[:n].copy_(src)  # uint8 converts unsigned
        torch.sum(b, dim=0, out=partial[j, 1])
        if em:
            partial[j, 2] = _count_exponent(b, em)
        w = torch.add(base[:n], ((offset + start) * MULT) & _MASK32, out=wbuf[:n])  # < 2^33, no overflow
        w.bitwise_and_(_MASK32).mul_(b)  # w_i * b_i < 2^48 for <= 16-bit values; wraps mod 2^64 for wider ones
        torch.sum(w, dim=0, out=partial[j, 0])
    return partial.sum(dim=0)


_WORK = threading.local()  # per thread: the CPU path's two int64 work buffers, reused across calls


def _cpu_work(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int64 buffers of at least `step` elements, allocated once per thread: a model has hundreds of tensors,
    and fresh 2 MiB buffers per call cost page faults (or heap growth) every time."""
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None or bufs[0].numel() < step:
        size = max(step, _CPU_STEP)
        bufs = _WORK.bufs = (torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64))
    return bufs


def _count_exponent(b: torch.Tensor, em: int) -> torch.Tensor:
    """How many of the bit patterns b (int64) have every bit of the exponent mask em set (inf or NaN)."""
    mask = em - (1 << 64) if em >= 1 << 63 else em  # as a signed int64 constant
    return torch.bitwise_and(b, mask).eq_(mask).sum()


def _fingerprint_cpu(bits: torch.Tensor, offset: int, step: int, em: int = 0) -> torch.Tensor:
    """The CPU path: the fused C kernel where it is available, else the eager one (identical results)."""
    kernel = None if os.environ.get("DPO_DIST_FINGERPRINT_KERNEL", "1").strip() == "0" else _kernel()
    if kernel is None:
        return _fingerprint_cpu_eager(bits, offset, step, em)
    return _fingerprint_cpu_fused(kernel, bits, offset, em)


def _fingerprint_cpu_eager(bits: torch.Tensor, offset: int, step: int, em: int = 0) -> torch.Tensor:
    """The eager CPU path: four passes per step over int64 buffers that stay in cache.

    `bits` is an unsigned view (uint8/uint16/uint32) or int64. Per step: a zero-extending copy to int64 (= b_i, no
    mask pass), its sum, the weights (cached base + this step's constant, masked to 32 bits), and sum w_i*b_i (int64
    wraps mod 2^64, as the definition wants): one `torch.dot` on one thread; a multiply and a sum, which torch
    parallelizes, on several (dot does not: 2.5x slower than mul+sum on 2 threads, 10% faster on one). About 42
    bytes read and 24 written per element, in cache, against the 2 bytes torch.sum reads from a bf16 tensor: ~13x
    torch.sum on one thread (bench/README.md), hence the fused kernel below; this is its fallback.
    """
    numel = bits.numel()
    base = _base_weights(step, bits.device)
    wbuf, bbuf = _cpu_work(step)
    if bits.dtype == torch.int64:
        bbuf = None
    use_dot = torch.get_num_threads() == 1
    starts = range(0, numel, step)
    partial = torch.zeros(len(starts), 3, dtype=torch.int64)  # summed once at the end
    for j, start in enumerate(starts):
        n = min(step, numel - start)
        src = bits[start : start + n]
        b = src if bbuf is None else bbuf[:n].copy_(src)
        torch.sum(b, dim=0, out=partial[j, 1])
        if em:
            partial[j, 2] = _count_exponent(b, em)
        w = torch.add(base[:n], ((offset + start) * MULT) & _MASK32, out=wbuf[:n]).bitwise_and_(_MASK32)
        if use_dot:
            partial[j, 0] = torch.dot(w, b)  # w_i < 2^32; products and sum wrap mod 2^64
        else:
            torch.sum(w.mul_(b), dim=0, out=partial[j, 0])
    return partial.sum(dim=0)


# -- the fused CPU kernel (its C source and why: dpo_dist/fingerprint_kernel.py) ---------------------------------
_KERNEL_NAMES = {1: "dpo_fingerprint_u8", 2: "dpo_fingerprint_u16", 4: "dpo_fingerprint_u32", 8: "dpo_fingerprint_u64"}
# Compiler flags to try, in order (without -march=native: no AVX, the plain loop only).
_KERNEL_FLAGS = (("-O3", "-march=native"), ("-O3",))

_KERNEL_LOCK = threading.Lock()
_KERNEL: dict[str, object] = {}  # "fns": {element size: ctypes function} or None once it failed; "compile_s"


def _kernel_cache_dir() -> Path:
    """torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions, as torch itself resolves it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return Path(root) / "dpo_dist_fingerprint"


def _cpu_identity() -> str:
    """What -march=native depends on, so a cache shared by different machines keeps one build per CPU kind."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({ln for ln in f if ln.split(":")[0].strip() in ("flags", "Features", "model name")}))
    except OSError:
        return platform.processor()


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "")) or [p for p in map(shutil.which, ("cc", "gcc", "clang")) if p][:1]
    if not cc:
        raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
    return cc


def _build_kernel(cc: list[str], flags: tuple[str, ...], directories: list[Path]) -> Path:
    """The shared library for these flags: from the first directory whose cache has it, else compiled into the first
    writable one. Raises CalledProcessError if the compiler fails, OSError if no directory is writable."""
    exe = shutil.which(cc[0]) or cc[0]
    st = os.stat(exe)  # a changed compiler gets a new key
    key = hashlib.sha256("\0".join(
        [_KERNEL_SOURCE, *cc, *flags, os.path.realpath(exe), str(st.st_size), str(st.st_mtime_ns), platform.machine(),
         _cpu_identity() if "-march=native" in flags else ""]).encode()).hexdigest()[:16]
    for directory in directories:
        if (directory / f"fingerprint_{key}.so").exists():
            return directory / f"fingerprint_{key}.so"
    error: OSError | None = None
    for directory in directories:
        lib = directory / f"fingerprint_{key}.so"
        tmp = directory / f".{lib.name}.{os.getpid()}.tmp"
        src = directory / f".{lib.name}.{os.getpid()}.c"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            src.write_text(_KERNEL_SOURCE)
        except OSError as e:  # not writable: try the next directory
            error = e
            continue
        try:
            proc = subprocess.run([*cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(src)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
            os.replace(tmp, lib)  # atomic: ranks compiling at once each rename a complete file
            return lib
        finally:
            for f in (src, tmp):
                f.unlink(missing_ok=True)
    raise error or OSError("no directory for the fingerprint kernel")


def _load_kernel(lib: Path) -> dict[int, object]:
    dll = ctypes.CDLL(str(lib))
    fns = {}
    for size, name in _KERNEL_NAMES.items():
        fn = getattr(dll, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64,
                       ctypes.c_void_p]
        fn.restype = None
        fns[size] = fn
    _self_check(fns)
    return fns


def _compile_kernel() -> dict[int, object]:
    """Compile (or find in the cache), load and self-check the kernel; raises on any failure."""
    cc = _compiler()
    directories = [_kernel_cache_dir(), Path(tempfile.gettempdir()) / f"dpo_dist_fingerprint_{os.getuid()}"]
    last_error = ""
    for flags in _KERNEL_FLAGS:
        try:
            return _load_kernel(_build_kernel(cc, flags, directories))
        except subprocess.CalledProcessError as e:  # these flags do not work with this compiler: try the next ones
            last_error = " ".join((e.stderr or e.stdout or "").split())[-300:]  # one line
    raise RuntimeError(f"compiling the fingerprint kernel failed: {last_error}")


def _self_check(fns: dict[int, object]) -> None:
    """The kernel must agree with the eager path bit for bit (guards against a miscompiling toolchain)."""
    gen = torch.Generator().manual_seed(0)
    masks = {1: [0], 2: [0, EXPONENT_MASKS[torch.bfloat16], EXPONENT_MASKS[torch.float16]],
             4: [0, EXPONENT_MASKS[torch.float32]], 8: [0, EXPONENT_MASKS[torch.float64]]}
    for size, dtype in _UNSIGNED_VIEWS.items():
        raw = torch.randint(0, 256, (1000 * size,), dtype=torch.uint8, generator=gen)
        raw[::7] = 0xFF  # every 7th byte all ones: exponent fields set (non-finite values) of every width
        raw = raw.view(dtype)
        for em in masks[size]:
            for bits, offset in ((raw, 5), (raw[1::3], (1 << 40) + 3)):
                got = _run_kernel(fns[size], bits, offset, em)
                want = _fingerprint_cpu_eager(bits, offset, _CPU_STEP, em)
                if not torch.equal(got, want):
                    raise RuntimeError(f"fingerprint kernel self-check failed for {size}-byte elements")


def _kernel() -> dict[int, object] | None:
    """The compiled kernel functions by element size, or None (eager fallback, warned about once per process)."""
    if "fns" in _KERNEL:
        return _KERNEL["fns"]
    with _KERNEL_LOCK:
        if "fns" not in _KERNEL:
            t0 = time.perf_counter()
            try:
                fns = _compile_kernel()
            except Exception as e:  # any failure means: use the eager path
                fns = None
                warnings.warn(f"dpo_dist.verify.fingerprint: the fused CPU kernel is unavailable ({e}); using the "
                              "eager "
                              "path (same results, ~10x slower)", RuntimeWarning, stacklevel=4)
            _KERNEL["compile_s"] = time.perf_counter() - t0
            _KERNEL["fns"] = fns
    return _KERNEL["fns"]


def _run_kernel(fn, bits: torch.Tensor, offset: int, em: int = 0) -> torch.Tensor:
    out = torch.empty(3, dtype=torch.int64)  # the kernel writes its sums as uint64: the same bits
    fn(bits.data_ptr(), bits.numel(), bits.stride(0), (offset * MULT) & _MASK32, em, out.data_ptr())
    return out


def _fingerprint_cpu_fused(fns: dict[int, object], bits: torch.Tensor, offset: int, em: int = 0) -> torch.Tensor:
    """One single-threaded pass of the C kernel over the 1-D view `bits` (any stride), whatever torch's thread count:
    ranks run one thread each, and splitting a tensor over two Python threads measured no faster on this busy 2-core
    machine."""
    return _run_kernel(fns[bits.element_size()], bits, offset, em)


def fingerprint_tensor(t: torch.Tensor) -> torch.Tensor:
    """Fingerprint of a whole tensor in logical (row-major) order; non-contiguous input is copied by reshape."""
    return fingerprint_flat(t.reshape(-1), 0)


def fingerprint_bytes(buf: bytes | bytearray | memoryview, dtype: torch.dtype, offset_elems: int,
                      scan: bool = False) -> torch.Tensor:
    """Fingerprint raw little-endian elements (a byte range of a safetensors file) at element offset offset_elems.

    Wraps the buffer without copying (torch.frombuffer) and returns int64 [2] on CPU ([3] with the non-finite count
    when `scan`); empty buffer -> zeros.
    """
    if sys.byteorder != "little":
        raise RuntimeError("fingerprint_bytes assumes a little-endian host (safetensors data is little-endian)")
    nbytes = memoryview(buf).nbytes
    if nbytes == 0:
        return torch.zeros(3 if scan else 2, dtype=torch.int64)
    size = torch.empty(0, dtype=dtype).element_size()
    if nbytes % size:
        raise ValueError(f"buffer of {nbytes} bytes is not a whole number of {dtype} elements")
    with warnings.catch_warnings():  # read-only bytes trigger a "not writable" warning; we never write
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=dtype)
    return fingerprint_scan(flat, offset_elems) if scan else fingerprint_flat(flat, offset_elems)


def fingerprint_hex(fp: torch.Tensor) -> str:
    """32 hex chars: both components as unsigned 64-bit, for logs and cross-process comparison."""
    a, b = (int(v) & 0xFFFFFFFFFFFFFFFF for v in fp.detach().cpu().reshape(-1)[:2].tolist())
    return f"{a:016x}{b:016x}"
