"""Fingerprint tests: exact agreement with a Python-int reference, additivity over any split, and sensitivity."""

from __future__ import annotations

import os
import random
import shutil
import warnings
from itertools import pairwise

import pytest
import torch

from dpo_dist.load.checkpoint import SAFETENSORS_DTYPES
from dpo_dist.verify import fingerprint as F
from dpo_dist.verify.fingerprint import (
    MULT,
    fingerprint_bytes,
    fingerprint_flat,
    fingerprint_hex,
    fingerprint_tensor,
    shard_range,
)

M64 = 1 << 64
BITS = {torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16), torch.float32: (torch.int32, 32)}
BITS |= {torch.int64: (torch.int64, 64), torch.float64: (torch.int64, 64), torch.uint8: (torch.uint8, 8)}


def ref_fingerprint(t: torch.Tensor, offset: int = 0) -> tuple[int, int]:
    """Definition, literally, with Python ints: (sum w_i b_i, sum b_i) mod 2^64 as unsigned."""
    view_dtype, nbits = BITS[t.dtype]
    vals = t.reshape(-1).view(view_dtype).tolist()
    bs = [v % (1 << nbits) for v in vals]
    s1 = sum((((i + offset + 1) * MULT) % (1 << 32)) * b for i, b in enumerate(bs)) % M64
    return s1, sum(bs) % M64


def as_unsigned(fp: torch.Tensor) -> tuple[int, int]:
    a, b = fp.tolist()
    return a % M64, b % M64


def wrap_sum(fps: list[torch.Tensor]) -> torch.Tensor:
    """What the all-reduce SUM does: int64 addition with wraparound."""
    return torch.stack(fps).sum(dim=0)


def random_tensor(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return (torch.randn(n, generator=gen, dtype=torch.float64) * 100).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    # full 64-bit range, including negatives, so the 64-bit path wraps for real
    return torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64) * 2 + torch.randint(0, 2, (n,))


REF_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.uint8]


@pytest.mark.parametrize("dtype", REF_DTYPES)
def test_matches_python_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 5, 37, 1000):
        t = random_tensor(dtype, n, gen)
        assert as_unsigned(fingerprint_tensor(t)) == ref_fingerprint(t)
        far = 123_456_789_012  # beyond 2^32: weights repeat there, but the definition still holds
        assert as_unsigned(fingerprint_flat(t, offset=far, chunk=16)) == ref_fingerprint(t, far)


def test_empty_and_output_format() -> None:
    fp = fingerprint_flat(torch.empty(0, dtype=torch.bfloat16), offset=5)
    assert fp.dtype == torch.int64 and fp.shape == (2,) and fp.tolist() == [0, 0]
    assert fingerprint_hex(torch.tensor([-1, 1], dtype=torch.int64)) == "f" * 16 + "0" * 15 + "1"
    with pytest.raises(ValueError):
        fingerprint_flat(torch.zeros(2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_additive_over_random_splits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    rng = random.Random(3)
    t = random_tensor(dtype, 4099, gen)
    whole = fingerprint_tensor(t)
    empty_pieces = 0
    for k in range(1, 9):
        for rep in range(5):
            # the first round cuts only at 0, 100 and the end, so pieces are often empty (repeated cuts)
            pool = [0, 100, t.numel()] if rep == 0 else range(t.numel() + 1)
            cuts = sorted(rng.choice(pool) for _ in range(k - 1))
            bounds = [0, *cuts, t.numel()]
            chunks = [rng.choice([3, 64, 1 << 22]) for _ in range(k)]
            pieces = [
                fingerprint_flat(t[a:b], offset=a, chunk=c) for (a, b), c in zip(pairwise(bounds), chunks, strict=True)
            ]
            assert torch.equal(wrap_sum(pieces), whole)
            empty_pieces += sum(a == b for a, b in pairwise(bounds))
    assert empty_pieces > 0
    # a wrong offset must break it, or the check above would prove nothing
    assert not torch.equal(wrap_sum([fingerprint_flat(t[:100]), fingerprint_flat(t[100:], offset=99)]), whole)


@pytest.mark.parametrize("numel", [1, 6, 7, 100, 1001])
def test_additive_over_zero3_shards(numel: int) -> None:
    t = random_tensor(torch.bfloat16, numel, torch.Generator().manual_seed(numel))
    whole = fingerprint_tensor(t)
    for world in range(1, 8):
        ranges = [shard_range(numel, r, world) for r in range(world)]
        part = -(-numel // world)
        assert [s for s, _ in ranges] == [r * part for r in range(world)]
        assert sum(n for _, n in ranges) == numel  # the padding at the end is owned by nobody
        # a ZeRO-3 rank holds a padded partition; only its first n elements are real
        shards = [torch.cat([t[s : s + n], torch.ones(part - n, dtype=t.dtype)]) for s, n in ranges]
        fps = [fingerprint_flat(sh[:n], offset=s) for sh, (s, n) in zip(shards, ranges, strict=True)]
        assert torch.equal(wrap_sum(fps), whole), world
    assert shard_range(10, 3, 4) == (9, 1) and shard_range(2, 3, 4) == (3, 0)


def test_sensitive_to_one_bit_and_to_swaps() -> None:
    t = random_tensor(torch.bfloat16, 513, torch.Generator().manual_seed(4))
    base = fingerprint_tensor(t)
    for i in (0, 1, 256, 512):
        u = t.clone()
        u.view(torch.int16)[i] ^= 1  # lowest mantissa bit
        fp = fingerprint_tensor(u)
        assert fp[0] != base[0] and fp[1] != base[1], i
    i, j = 10, 400
    assert t[i] != t[j]
    u = t.clone()
    u[i], u[j] = t[j], t[i]
    fp = fingerprint_tensor(u)
    assert fp[0] != base[0] and fp[1] == base[1]


def test_chunk_size_independent() -> None:
    t = random_tensor(torch.float16, 1000, torch.Generator().manual_seed(5))
    expected = fingerprint_flat(t, offset=77)
    for chunk in (1, 7, 999, 1000, 1001):
        assert torch.equal(fingerprint_flat(t, offset=77, chunk=chunk), expected)
    assert as_unsigned(expected) == ref_fingerprint(t, 77)


@pytest.mark.parametrize("name", ["BF16", "F32", "I64", "U8", "BOOL"])
def test_bytes_match_tensor_slices(name: str) -> None:
    dtype = SAFETENSORS_DTYPES[name]
    gen = torch.Generator().manual_seed(6)
    if dtype == torch.bool:
        t = torch.rand(301, generator=gen) > 0.5
    else:
        t = random_tensor(dtype, 301, gen)
    raw = t.view(torch.uint8).numpy().tobytes()
    size = t.element_size()
    for a, b in [(0, 301), (0, 0), (17, 18), (100, 250), (250, 301)]:
        for buf in (raw[a * size : b * size], memoryview(bytearray(raw))[a * size : b * size]):
            assert torch.equal(fingerprint_bytes(buf, dtype, a), fingerprint_flat(t[a:b], offset=a))
    assert fingerprint_bytes(raw, dtype, 0).tolist() != [0, 0]
    assert set(SAFETENSORS_DTYPES) == {"BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def test_non_contiguous_input() -> None:
    t = random_tensor(torch.bfloat16, 12 * 35, torch.Generator().manual_seed(7)).reshape(12, 35)
    nc = t.t()  # logical order differs from memory order
    assert not nc.is_contiguous()
    assert torch.equal(fingerprint_tensor(nc), fingerprint_tensor(nc.contiguous()))
    assert not torch.equal(fingerprint_tensor(nc), fingerprint_tensor(t))
    strided = t.reshape(-1)[::3]
    assert torch.equal(fingerprint_flat(strided, offset=9, chunk=5), fingerprint_flat(strided.contiguous(), offset=9))


def test_int64_wraparound_against_reference() -> None:
    n = 3_000_000
    t = torch.full((n,), -1, dtype=torch.int16).view(torch.bfloat16)  # all bits set: b_i = 0xFFFF
    # closed form of the reference for constant b: b * sum_i w_i, with sum_i w_i computed by Python ints
    sum_w = sum(((i + 1) * MULT) % (1 << 32) for i in range(n))
    expected = ((0xFFFF * sum_w) % M64, (0xFFFF * n) % M64)
    assert 0xFFFF * sum_w >= M64  # the first component really wraps
    assert as_unsigned(fingerprint_tensor(t)) == expected
    big = torch.full((n,), -1, dtype=torch.int64)  # 64-bit patterns: both components wrap
    assert as_unsigned(fingerprint_tensor(big)) == (((M64 - 1) * sum_w) % M64, ((M64 - 1) * n) % M64)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.bfloat16, torch.float32, torch.int64, torch.uint8):
        t = random_tensor(dtype, 10_007, gen)
        for offset, chunk in [(0, 1 << 22), (999_999, 1000)]:
            fp = fingerprint_flat(t.cuda(), offset=offset, chunk=chunk)
            assert fp.device.type == "cuda"
            assert torch.equal(fp.cpu(), fingerprint_flat(t, offset=offset)), (dtype, offset)


# -- the fused CPU kernel against the eager path -------------------------------------------------------------------
# (the tests above go through whichever path fingerprint_flat picks: the kernel, or the eager path under
# DPO_DIST_FINGERPRINT_KERNEL=0; these compare the two directly)

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]


def _kernel_or_skip():
    fns = F._kernel()
    if fns is None:
        pytest.skip("the fused fingerprint kernel is unavailable here (no working C compiler)")
    return fns


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The kernel as it ships (-march=native), and built with the other code paths its source has where this
    machine can run them: AVX2 (when -march=native gives AVX-512) and no SIMD at all (plain -O3)."""
    shipped = _kernel_or_skip()
    out = {"shipped": shipped}
    cpu = F._cpu_identity()
    variants = {"plain": ("-O3",)}
    if " avx2" in cpu:
        variants["avx2"] = ("-O3", "-mavx2")
    directory = tmp_path_factory.mktemp("fingerprint_kernels")
    for name, flags in variants.items():
        out[name] = F._load_kernel(F._build_kernel(F._compiler(), flags, [directory]))
    return out


def _random_any(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (all of them: NaNs, negative zeros, all-ones) viewed as dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=gen, dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw & 1).view(torch.bool)
    return raw.view(dtype)


def test_kernel_available_where_a_compiler_is() -> None:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine: the eager path is the expected one")
    assert F._kernel() is not None, "a C compiler exists but the fingerprint kernel did not build"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fused_matches_eager(dtype: torch.dtype, kernels: dict[str, dict]) -> None:
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(12)
    # around the kernel's 2^16-element blocks, and random sizes
    sizes = [0, 1, 2, 15, 17, 65535, 65536, 65537, 3 * 65536 + 5, *(rng.randrange(1, 300_000) for _ in range(3))]
    offsets = [0, 1, 7, 65535, (1 << 32) - 1, 1 << 32, 123_456_789_012, (1 << 62) + 3]
    for n in sizes:
        t = _random_any(dtype, n, gen)
        bits = t.view(F._UNSIGNED_VIEWS[t.element_size()])
        for offset in rng.sample(offsets, 2):
            for view in (bits, bits[1::3], bits[::2], bits[5:]):
                want = F._fingerprint_cpu_eager(view, offset, F._CPU_STEP)
                for name, fns in kernels.items():
                    got = F._fingerprint_cpu_fused(fns, view, offset)
                    assert torch.equal(got, want), (name, dtype, n, offset, view.stride(0))
    # all bits set: the widest products, and (64-bit) the wrapping ones
    size = torch.empty(0, dtype=dtype).element_size()
    bits = torch.full((70_000 * size,), 255, dtype=torch.uint8).view(F._UNSIGNED_VIEWS[size])
    want = F._fingerprint_cpu_eager(bits, 9, F._CPU_STEP)
    assert all(torch.equal(F._fingerprint_cpu_fused(fns, bits, 9), want) for fns in kernels.values())


def test_kernel_builds_into_a_fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _kernel_or_skip()
    monkeypatch.setattr(F, "_KERNEL", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert F._kernel() is not None
    assert len(list(tmp_path.glob("dpo_dist_fingerprint/fingerprint_*.so"))) == 1
    assert not list(tmp_path.glob("dpo_dist_fingerprint/.*"))  # no temporary files left behind
    assert F._KERNEL["compile_s"] < 60


def test_fallback_without_compiler_warns_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(F, "_KERNEL", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("DPO_DIST_FINGERPRINT_KERNEL", raising=False)
    t = random_tensor(torch.float16, 1000, torch.Generator().manual_seed(14))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fps = [fingerprint_flat(t, offset=5) for _ in range(3)]
    assert [str(w.message).count("\n") for w in caught] == [0], [str(w.message) for w in caught]
    assert "eager" in str(caught[0].message)
    assert F._KERNEL["fns"] is None
    assert all(as_unsigned(fp) == ref_fingerprint(t, 5) for fp in fps)


def test_env_var_forces_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the fused kernel ran despite DPO_DIST_FINGERPRINT_KERNEL=0")

    monkeypatch.setenv("DPO_DIST_FINGERPRINT_KERNEL", "0")
    monkeypatch.setattr(F, "_fingerprint_cpu_fused", boom)
    monkeypatch.setattr(F, "_kernel", boom)
    t = random_tensor(torch.bfloat16, 1000, torch.Generator().manual_seed(15))
    assert as_unsigned(fingerprint_flat(t, offset=3)) == ref_fingerprint(t, 3)


# -- the finiteness scan riding on the fingerprint pass (issue 13.2) -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_count_every_path(dtype: torch.dtype, kernels: dict[str, dict]) -> None:
    """One inf or NaN among finite values is counted, by the kernel (every SIMD variant) and the eager path alike, in
    contiguous and strided views, and the fingerprint part is unchanged by the scan."""
    gen = torch.Generator().manual_seed(21)
    em = F.EXPONENT_MASKS[dtype]
    for n, bad_at in ((1, [0]), (17, [16]), (65537, [65536]), (200_003, [3, 100_000, 200_002])):
        t = (torch.randn(n, generator=gen, dtype=torch.float64) * 100).to(dtype)
        for k, i in enumerate(bad_at):
            t[i] = (float("nan"), float("inf"), float("-inf"))[k % 3]
        bits = t.view(F._UNSIGNED_VIEWS[t.element_size()])
        for view, want_count in ((bits, len(bad_at)), (bits[1:], sum(i >= 1 for i in bad_at))):
            eager = F._fingerprint_cpu_eager(view, 5, F._CPU_STEP, em)
            assert int(eager[2]) == want_count, (dtype, n)
            assert torch.equal(eager[:2], F._fingerprint_cpu_eager(view, 5, F._CPU_STEP)[:2])
            for name, fns in kernels.items():
                assert torch.equal(F._fingerprint_cpu_fused(fns, view, 5, em), eager), (name, dtype, n)
        assert int(F.fingerprint_scan(t)[2]) == len(bad_at)
        assert torch.equal(F.fingerprint_scan(t)[:2], fingerprint_flat(t))
        assert int(fingerprint_bytes(t.view(torch.uint8).numpy().tobytes(), dtype, 0, scan=True)[2]) == len(bad_at)


def test_nonfinite_scan_ignores_integers_and_finite_extremes() -> None:
    for dtype in (torch.int16, torch.int32, torch.int64, torch.uint8):
        t = torch.full((1000,), -1, dtype=torch.int64).to(dtype)  # all bits set: non-finite if it were a float
        assert int(F.fingerprint_scan(t)[2]) == 0
    for dtype in F.EXPONENT_MASKS:
        info = torch.finfo(dtype)
        t = torch.tensor([info.max, -info.max, info.tiny, 0.0, -0.0], dtype=dtype)
        assert int(F.fingerprint_scan(t)[2]) == 0


def test_nonfinite_additive_over_shards() -> None:
    t = torch.randn(10_001).to(torch.bfloat16)
    t[[3, 5000, 10_000]] = float("nan")
    shards = [shard_range(t.numel(), r, 3) for r in range(3)]
    parts = [F.fingerprint_scan(t[s:s + c], s) for s, c in shards]
    assert torch.equal(wrap_sum(parts), F.fingerprint_scan(t))


def test_model_fingerprints_name_the_nonfinite_tensor() -> None:
    from dpo_dist.runtime.distributed import DistContext
    from dpo_dist.verify import weights

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    clean: dict[str, int] = {}
    weights.model_fingerprints(model, DistContext(0, 1), nonfinite=clean)
    assert clean == {}
    with torch.no_grad():
        model[1].weight[2, 3] = float("inf")
    found: dict[str, int] = {}
    weights.model_fingerprints(model, DistContext(0, 1), nonfinite=found)
    assert found == {"1.weight": 1}


@pytest.mark.gpu
def test_cuda_nonfinite_count_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(22)
    for dtype in F.EXPONENT_MASKS:
        t = (torch.randn(30_011, generator=gen, dtype=torch.float64) * 100).to(dtype)
        t[[0, 4096, 30_010]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64).to(dtype)
        for offset, chunk in [(0, 1 << 22), (999_999, 1000)]:
            got = F.fingerprint_scan(t.cuda(), offset=offset, chunk=chunk)
            assert got.device.type == "cuda"
            assert torch.equal(got.cpu(), F.fingerprint_scan(t, offset=offset)), (dtype, offset)
            assert int(got[2]) == 3
