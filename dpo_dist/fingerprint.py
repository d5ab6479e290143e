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
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch

MULT = 0x9E3779B1
_MASK32 = 0xFFFFFFFF
# CPU: elements per step. Steps of 2^18 keep the int64 work buffers (2 MiB each) in cache; measured on a 2-core EPYC,
# 50M bf16 elements, one thread: 2^16 50 ms, 2^17 43 ms, 2^18 40 ms, 2^20 48-52 ms; every tensor of a 0.44B model,
# two threads: 2^18 0.26 s, 2^20 1.1 s.
_CPU_STEP = 1 << 18

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Element width in bytes -> (integer view dtype, mask that makes its value the unsigned bit pattern, or None).
_VIEWS: dict[int, tuple[torch.dtype, int | None]] = {
    1: (torch.uint8, None),
    2: (torch.int16, 0xFFFF),
    4: (torch.int32, _MASK32),
    8: (torch.int64, None),
}
# CPU: unsigned views, whose conversion to int64 zero-extends (the bit pattern itself, no mask pass needed).
_UNSIGNED_VIEWS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.int64}

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
    part = -(-numel // world)
    start = rank * part
    return start, max(0, min(part, numel - start))


def fingerprint_flat(flat: torch.Tensor, offset: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """Fingerprint of a 1-D slice holding global positions [offset, offset + numel) of some flattened tensor.

    Runs on flat's device and returns int64 [2] there (no host sync). Works ``chunk`` elements at a time (at most
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
        return torch.zeros(2, dtype=torch.int64, device=device)
    size = flat.element_size()
    if size not in _VIEWS or flat.is_complex():
        raise TypeError(f"unsupported dtype for fingerprinting: {flat.dtype}")
    if device.type == "cpu":
        return _fingerprint_cpu(flat.view(_UNSIGNED_VIEWS[size]), offset, min(chunk, numel, _CPU_STEP))
    view_dtype, mask = _VIEWS[size]
    bits = flat.view(view_dtype)  # reinterpret, no copy (same element size works for any stride)
    step = min(chunk, numel)
    base = _base_weights(step, device)
    wbuf = torch.empty(step, dtype=torch.int64, device=device)
    bbuf = None if view_dtype == torch.int64 else torch.empty(step, dtype=torch.int64, device=device)
    # Mixed-dtype ops cast inside the kernel on GPUs (one pass instead of copy + mask).
    mask_t = None if mask is None else torch.full((1,), mask, dtype=torch.int64, device=device)
    starts = range(0, numel, step)
    partial = torch.empty(len(starts), 2, dtype=torch.int64, device=device)  # summed once at the end
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


def _fingerprint_cpu(bits: torch.Tensor, offset: int, step: int) -> torch.Tensor:
    """The CPU path: four passes per step over int64 buffers that stay in cache.

    `bits` is an unsigned view (uint8/uint16/uint32) or int64. Per step: a zero-extending copy to int64 (= b_i, no
    mask pass), its sum, the weights (cached base + this step's constant, masked to 32 bits), and sum w_i*b_i (int64
    wraps mod 2^64, as the definition wants): one `torch.dot` on one thread; a multiply and a sum, which torch
    parallelizes, on several (dot does not: 2.5x slower than mul+sum on 2 threads, 10% faster on one). About 42
    bytes read and 24 written per element, in cache, against the 2 bytes torch.sum reads from a bf16 tensor: see
    bench/README.md for what this costs and what a fused kernel gives.
    """
    numel = bits.numel()
    base = _base_weights(step, bits.device)
    wbuf, bbuf = _cpu_work(step)
    if bits.dtype == torch.int64:
        bbuf = None
    use_dot = torch.get_num_threads() == 1
    starts = range(0, numel, step)
    partial = torch.empty(len(starts), 2, dtype=torch.int64)  # summed once at the end
    for j, start in enumerate(starts):
        n = min(step, numel - start)
        src = bits[start : start + n]
        b = src if bbuf is None else bbuf[:n].copy_(src)
        torch.sum(b, dim=0, out=partial[j, 1])
        w = torch.add(base[:n], ((offset + start) * MULT) & _MASK32, out=wbuf[:n]).bitwise_and_(_MASK32)
        if use_dot:
            partial[j, 0] = torch.dot(w, b)  # w_i < 2^32; products and sum wrap mod 2^64
        else:
            torch.sum(w.mul_(b), dim=0, out=partial[j, 0])
    return partial.sum(dim=0)


def fingerprint_tensor(t: torch.Tensor) -> torch.Tensor:
    """Fingerprint of a whole tensor in logical (row-major) order; non-contiguous input is copied by reshape."""
    return fingerprint_flat(t.reshape(-1), 0)


def fingerprint_bytes(buf: bytes | bytearray | memoryview, dtype: torch.dtype, offset_elems: int) -> torch.Tensor:
    """Fingerprint raw little-endian elements (a byte range of a safetensors file) at element offset offset_elems.

    Wraps the buffer without copying (torch.frombuffer) and returns int64 [2] on CPU; empty buffer -> zeros.
    """
    if sys.byteorder != "little":
        raise RuntimeError("fingerprint_bytes assumes a little-endian host (safetensors data is little-endian)")
    nbytes = memoryview(buf).nbytes
    if nbytes == 0:
        return torch.zeros(2, dtype=torch.int64)
    size = torch.empty(0, dtype=dtype).element_size()
    if nbytes % size:
        raise ValueError(f"buffer of {nbytes} bytes is not a whole number of {dtype} elements")
    with warnings.catch_warnings():  # read-only bytes trigger a "not writable" warning; we never write
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=dtype)
    return fingerprint_flat(flat, offset_elems)


def fingerprint_hex(fp: torch.Tensor) -> str:
    """32 hex chars: both components as unsigned 64-bit, for logs and cross-process comparison."""
    a, b = (int(v) & 0xFFFFFFFFFFFFFFFF for v in fp.detach().cpu().reshape(-1).tolist())
    return f"{a:016x}{b:016x}"
