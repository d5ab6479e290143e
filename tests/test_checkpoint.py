"""Checkpoint tests: our safetensors header parser against safetensors itself, and every preflight refusal."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dpo_dist.load.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    TensorEntry,
    preflight,
    read_elements,
    read_safetensors_header,
    tensor_index,
    weight_files,
)

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "layer.0.weight": torch.randn(3, 4, generator=g),
        "layer.0.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(11, generator=g),
    }


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 7, generator=g) * 100
    return {
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "f32": base.clone(),
        "f64": base.to(torch.float64),
        "i64": base.to(torch.int64),
        "i32": base.to(torch.int32),
        "i16": base.to(torch.int16),
        "i8": base.clamp(-128, 127).to(torch.int8),
        "u8": base.abs().clamp(0, 255).to(torch.uint8),
        "bool": base > 0,
        "scalar": torch.tensor(3.5, dtype=torch.float32),
    }


def make_ckpt(d: Path, ts: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    save_file(tensors() if ts is None else ts, str(d / SINGLE_NAME), metadata={"format": "pt"})
    return d


def make_sharded(d: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    ts = tensors(2)
    names = sorted(ts)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, ns in shards.items():
        save_file({n: ts[n] for n in ns}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in ns})
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return d, ts


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def elem_bytes(t: torch.Tensor, start: int, n: int) -> bytes:
    return raw(t.reshape(-1)[start:start + n])


# ---------------------------------------------------------------- header parsing and byte ranges


def test_header_matches_tensors(tmp_path):
    ts = all_dtypes()
    make_ckpt(tmp_path, ts)
    hdr = read_safetensors_header(tmp_path / SINGLE_NAME)
    assert set(hdr) == set(ts)  # __metadata__ skipped
    for name, t in ts.items():
        e = hdr[name]
        assert isinstance(e, TensorEntry)
        assert e.name == name and e.file == str(tmp_path / SINGLE_NAME)
        assert e.dtype == t.dtype
        assert e.shape == tuple(t.shape)
        assert e.numel == t.numel()
        assert e.nbytes == t.numel() * t.element_size()


def test_whole_tensor_bytes(tmp_path):
    ts = all_dtypes()
    make_ckpt(tmp_path, ts)
    hdr = read_safetensors_header(tmp_path / SINGLE_NAME)
    for name, t in ts.items():
        assert read_elements(hdr[name], 0, t.numel()) == raw(t), name


@pytest.mark.parametrize("name", ["bf16", "f16", "f32", "f64", "i64", "i32", "i16", "i8", "u8", "bool"])
def test_arbitrary_ranges(tmp_path, name):
    ts = all_dtypes()
    make_ckpt(tmp_path, ts)
    entry = read_safetensors_header(tmp_path / SINGLE_NAME)[name]
    t = ts[name]
    numel = t.numel()
    ranges = [(0, 1), (0, numel), (numel - 1, 1), (3, 5), (1, numel - 1), (17, 18), (numel // 2, numel - numel // 2)]
    for start, n in ranges:
        got = read_elements(entry, start, n)
        assert got == elem_bytes(t, start, n), (start, n)
        assert len(got) == n * t.element_size()
    # the bytes decode back to exactly the stored values
    back = torch.frombuffer(bytearray(read_elements(entry, 4, 9)), dtype=t.dtype)
    assert torch.equal(back, t.reshape(-1)[4:13])


def test_empty_range_reads_nothing(tmp_path):
    make_ckpt(tmp_path)
    entry = read_safetensors_header(tmp_path / SINGLE_NAME)["norm.weight"]
    assert read_elements(entry, 3, 0) == b""
    assert read_elements(entry, 3, -2) == b""


def test_offsets_are_absolute(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    hdr = read_safetensors_header(path)
    starts = sorted(e.start for e in hdr.values())
    assert starts[0] == 8 + n
    for e in hdr.values():
        assert data[e.start:e.start + e.nbytes] == read_elements(e, 0, e.numel)


def test_header_read_on_embedded_tiny_sft():
    d = Path(__file__).resolve().parents[1] / "dpo_dist" / "default" / "tiny-sft"
    from safetensors import safe_open

    idx = tensor_index(d)
    with safe_open(str(d / SINGLE_NAME), framework="pt") as f:
        assert set(idx) == set(f.keys())
        for name in list(idx)[:3]:
            t = f.get_tensor(name)
            e = idx[name]
            assert e.shape == tuple(t.shape) and e.dtype == t.dtype
            k = min(5, e.numel)
            assert read_elements(e, e.numel - k, k) == elem_bytes(t, e.numel - k, k)


def test_truncated_file_header_parse(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated") as ei:
        read_safetensors_header(path)
    assert "re-copy" in str(ei.value)


def test_file_shorter_than_length_prefix(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(path)


def test_truncated_after_header_read_elements(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    hdr = read_safetensors_header(path)
    last = max(hdr.values(), key=lambda e: e.start)
    path.write_bytes(path.read_bytes()[:last.start + 2])  # header was read before the file was cut
    with pytest.raises(CheckpointError, match=f"truncated inside tensor {last.name}"):
        read_elements(last, 0, last.numel)


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xfe\xff\x00garbage!"
                                     + b"\x00" * 40, b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{" + b"\x00" * 40])
def test_corrupt_header(tmp_path, garbage):
    path = tmp_path / SINGLE_NAME
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_safetensors_header(path)


def test_corrupt_header_in_real_file(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xde\xad\xbe\xef" * 4  # overwrite the start of the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_safetensors_header(path)


def test_unsupported_dtype(tmp_path):
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / SINGLE_NAME
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00")
    with pytest.raises(CheckpointError, match="tensor x has unsupported dtype F8_E4M3"):
        read_safetensors_header(path)


# ---------------------------------------------------------------- preflight


def test_preflight_valid_returns_config(tmp_path):
    make_ckpt(tmp_path)
    assert preflight(tmp_path) == CONFIG
    assert preflight(str(tmp_path)) == CONFIG


def test_preflight_directory_missing(tmp_path):
    d = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        preflight(d)
    assert str(d) in str(ei.value)


def test_preflight_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="does not exist"):
        preflight(f)


def test_preflight_no_config(tmp_path):
    make_ckpt(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        preflight(tmp_path)


def test_preflight_config_not_json(tmp_path):
    make_ckpt(tmp_path)
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}\n')
    with pytest.raises(CheckpointError, match="is not valid JSON") as ei:
        preflight(tmp_path)
    assert "at line 3" in str(ei.value)
    assert "config.json" in str(ei.value)


def test_preflight_no_weights(tmp_path):
    tmp_path.joinpath("config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match="no weights in") as ei:
        preflight(tmp_path)
    assert SINGLE_NAME in str(ei.value) and INDEX_NAME in str(ei.value)


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_preflight_pickle_only(tmp_path, pickle_name):
    tmp_path.joinpath("config.json").write_text(json.dumps(CONFIG))
    (tmp_path / pickle_name).write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="allow_pickle") as ei:
        preflight(tmp_path)
    assert "pickle" in str(ei.value)
    assert preflight(tmp_path, allow_pickle=True) == CONFIG
    assert weight_files(tmp_path, allow_pickle=True) == []


def test_safetensors_preferred_over_pickle(tmp_path):
    make_ckpt(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert preflight(tmp_path) == CONFIG
    assert weight_files(tmp_path) == [tmp_path / SINGLE_NAME]


def test_preflight_truncated_file_is_caught_by_tensor_index(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated"):
        tensor_index(tmp_path)


def test_preflight_truncated_file(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / SINGLE_NAME
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated"):
        preflight(tmp_path)


def test_preflight_corrupt_header(tmp_path):
    make_ckpt(tmp_path)
    (tmp_path / SINGLE_NAME).write_bytes(b"\xff" * 128)
    with pytest.raises(CheckpointError, match="corrupt"):
        preflight(tmp_path)


def test_preflight_sharded_missing_shard(tmp_path):
    d, _ = make_sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names missing shard") as ei:
        preflight(d)
    msg = str(ei.value)
    assert "model-00002-of-00002.safetensors" in msg
    assert "model-00001-of-00002.safetensors" not in msg


def test_preflight_sharded_index_not_json(tmp_path):
    d, _ = make_sharded(tmp_path)
    (d / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        preflight(d)


def test_preflight_sharded_index_without_weight_map(tmp_path):
    d, _ = make_sharded(tmp_path)
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        preflight(d)


def test_sharded_checkpoint_tensor_index(tmp_path):
    d, ts = make_sharded(tmp_path)
    assert preflight(d) == CONFIG
    files = weight_files(d)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    idx = tensor_index(d)
    assert set(idx) == set(ts)
    weight_map = json.loads((d / INDEX_NAME).read_text())["weight_map"]
    for name, t in ts.items():
        e = idx[name]
        assert Path(e.file).name == weight_map[name]
        assert e.dtype == t.dtype and e.shape == tuple(t.shape)
        assert read_elements(e, 0, e.numel) == raw(t)
        assert read_elements(e, 1, e.numel - 2) == elem_bytes(t, 1, e.numel - 2)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    """Issue 21, item 3: which copy a loader takes would depend on its order."""
    d, ts = make_sharded(tmp_path)
    names = sorted(ts)
    second = {n: ts[n] for n in names[2:]} | {names[0]: ts[names[0]] + 1}
    save_file(second, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {names[0]} is in two shards"):
        preflight(d)


def test_an_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path):
    d, _ = make_sharded(tmp_path)
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["phantom.weight"] = "model-00001-of-00002.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names tensor phantom.weight in model-00001-of-00002.safetensors, but "
                                              "no shard holds it"):
        preflight(d)


def test_safetensors_shards_win_over_pickle_and_a_bin_index(tmp_path):
    """transformers' order: safetensors (single, then index) before any pickle file or pickle index."""
    d, _ = make_sharded(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    (d / "pytorch_model.bin.index.json").write_text("{}")
    assert [f.name for f in weight_files(d)] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
