"""What is in a checkpoint directory, read without loading it: config, weight files, tensor byte ranges.

Each rank later reads only its own slice of each tensor (for the file fingerprint), so we parse the safetensors
headers ourselves: 8-byte little-endian header length, a JSON header, then raw data whose `data_offsets` are relative
to the end of the header. `safe_open(...).get_slice` would do as well but maps the whole file into RSS.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_dist.config.names import Dtype

# model.dtype (the config's names) -> torch dtype
DTYPES = {Dtype.BFLOAT16: torch.bfloat16, Dtype.FLOAT16: torch.float16, Dtype.FLOAT32: torch.float32}
# safetensors header dtype names
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

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, with the fix in the message."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: str | Path) -> dict[str, TensorEntry]:
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header): re-copy or re-save the checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path} has a corrupt safetensors header (length {n}): re-copy the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header: re-copy the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: re-copy the file")
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end, dtype, shape = _entry(path, name, meta)
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes; "
                "re-copy or re-save the checkpoint"
            )
        spans.append((begin, end, name))
        out[name] = TensorEntry(name, path, dtype, shape, base + begin, end - begin)
    reach, holder = 0, ""  # the furthest end so far and its tensor: any later start before it is an overlap
    for begin, end, name in sorted(spans):
        if begin < reach and end > begin:  # an empty tensor may sit at any offset
            raise CheckpointError(f"{path} has a corrupt safetensors header (tensors {holder} and {name} overlap): "
                                  "re-copy the file")
        if end > reach:
            reach, holder = end, name
    return out


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: str, name: str, meta: object) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, every field checked: a hand-edited or corrupt header must
    end in a named line, not a TypeError deep in the loader."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt safetensors header (tensor {name}: {what}): re-copy the file")

    if not isinstance(meta, dict) or "data_offsets" not in meta or "shape" not in meta:
        raise corrupt("no data_offsets or shape")
    dtype = SAFETENSORS_DTYPES.get(meta.get("dtype", "")) if isinstance(meta.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(_whole(s) for s in shape):
        raise corrupt(f"shape must be a list of whole numbers >= 0, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise corrupt(f"data_offsets must be two whole numbers >= 0, got {offsets!r}")
    begin, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    want = numel * torch.empty((), dtype=dtype).element_size()
    if begin > end or end - begin != want:
        raise corrupt(f"data_offsets {offsets} hold {end - begin} bytes, dtype x shape needs {want}")
    return begin, end, dtype, tuple(shape)


def weight_files(ckpt: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist; pickle-only checkpoints are refused by default.

    The one place that decides a checkpoint's weight set, for the fast loader, preflight and the file fingerprint
    alike, in transformers' own order (5.23 modeling_utils._get_resolved_checkpoint_files): config.json's
    `transformers_weights`, then model.safetensors, then the safetensors index, then pickle. Any other order proves
    and trains other weights than every later from_pretrained(model.path) loads (issue 21, #41)."""
    d = Path(ckpt)
    explicit = _explicit_name(d)
    if explicit is not None:
        if explicit.endswith(".index.json"):
            return _index_files(d, d / explicit)
        if not (d / explicit).is_file():
            raise CheckpointError(f"{d / 'config.json'} names transformers_weights {explicit!r}, which is not in {d}: "
                                  "copy it there or remove the key")
        return [d / explicit]
    if (d / SINGLE_NAME).is_file():
        return [d / SINGLE_NAME]
    if (d / INDEX_NAME).is_file():
        return _index_files(d, d / INDEX_NAME)
    if any((d / p).is_file() for p in PICKLE_NAMES):
        if allow_pickle:
            return []
        raise CheckpointError(
            f"{d} has only pickle .bin weights, which can run code when loaded: convert them to safetensors, "
            "or set model.allow_pickle: true if you trust the source"
        )
    raise CheckpointError(f"no weights in {d}: expected {SINGLE_NAME} or {INDEX_NAME}")


def _explicit_name(d: Path) -> str | None:
    """config.json's `transformers_weights` (a file name transformers loads before any default name), if set."""
    try:
        name = json.loads((d / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None  # preflight names a missing or broken config.json
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        return None
    return name


def _index_files(d: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{index} is not a valid safetensors index: re-save the checkpoint") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid safetensors index (weight_map must map tensor names to "
                              "file names): re-save the checkpoint")
    files = sorted({d / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} names missing shard(s) {', '.join(missing)}: copy them into {d}")
    return files


# bytes compared at the start, middle and end of each tensor when two weight sets sit in one directory: a stale set
# (an older save, another fine-tune) differs nearly everywhere, and reading every byte twice would cost a 70B load
PROBE_BYTES = 4096


def competing_sets(d: Path) -> str | None:
    """A directory holding model.safetensors and a safetensors index whose shards hold other tensors or bytes: name
    both sets. dpo-dist loads what transformers loads (weight_files), but a later tool with another order (or a
    user) may take the other set, and a stale set beside the real one is nearly always a copy gone wrong."""
    single, index = d / SINGLE_NAME, d / INDEX_NAME
    if not (single.is_file() and index.is_file()) or _explicit_name(d) is not None:
        return None
    shards = _index_files(d, index)
    a = read_safetensors_header(single)
    b: dict[str, TensorEntry] = {}
    for f in shards:
        b.update(read_safetensors_header(f))
    names = ", ".join(f.name for f in shards)
    differ = None
    if set(a) != set(b):
        differ = f"tensor {sorted(set(a) ^ set(b))[0]} is in only one of them"
    else:
        for name in sorted(a):
            x, y = a[name], b[name]
            if (x.dtype, x.shape) != (y.dtype, y.shape) or not _same_probes(x, y):
                differ = f"tensor {name} differs"
                break
    if differ is None:
        return None
    return (f"{d} holds two different weight sets, {SINGLE_NAME} and {INDEX_NAME} with shards {names} ({differ}); "
            f"transformers loads {SINGLE_NAME}. Fix: remove the stale set ({INDEX_NAME} and its shards, or "
            f"{SINGLE_NAME}) from {d}")


def _same_probes(x: TensorEntry, y: TensorEntry) -> bool:
    item = torch.empty((), dtype=x.dtype).element_size()
    n = max(1, PROBE_BYTES // item)
    starts = sorted({0, max(0, x.numel // 2 - n // 2), max(0, x.numel - n)})
    return all(read_elements(x, s, min(n, x.numel - s)) == read_elements(y, s, min(n, y.numel - s)) for s in starts)


def preflight(ckpt: str | Path, allow_pickle: bool = False) -> dict:
    """Cheap checks before any rank loads anything; returns config.json as a dict."""
    d = Path(ckpt)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist: check model.path / reference.path")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d} has no config.json: point to a directory written by save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}): re-save it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object: re-save the checkpoint")
    problem = competing_sets(d)
    if problem:
        raise CheckpointError(problem)
    entries: dict[str, TensorEntry] = {}
    holder: dict[str, str] = {}
    for f in weight_files(d, allow_pickle):
        header = read_safetensors_header(f)  # 8 bytes + the JSON header: truncated/corrupt files, early
        twice = sorted(set(header) & set(entries))
        if twice:  # which copy a loader takes depends on its order: tensor_index and from_pretrained could differ
            raise CheckpointError(f"tensor {twice[0]} is in two shards of {d}, {holder[twice[0]]} and {f.name}: "
                                  "re-save the checkpoint with save_pretrained")
        entries.update(header)
        holder.update(dict.fromkeys(header, f.name))
    check_index_names(d, entries)
    check_vocab_rows(cfg_path, config, entries)
    return config


def check_index_names(d: Path, entries: dict[str, TensorEntry]) -> None:
    """Every tensor the index names is in the shard it names: a weight_map hand-edited or copied from another save
    names tensors the files lack, and a loader following the index would look for them where they are not."""
    explicit = _explicit_name(d)
    if explicit is not None:
        index = d / explicit if explicit.endswith(".index.json") else None
    else:
        index = d / INDEX_NAME if not (d / SINGLE_NAME).is_file() and (d / INDEX_NAME).is_file() else None
    if index is None:  # weight_files chose a single file (or pickle): no index to hold to
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, fname in sorted(weight_map.items()):
        e = entries.get(name)
        if e is None or Path(e.file).name != Path(fname).name:
            where = "no shard holds it" if e is None else f"it is in {Path(e.file).name}"
            raise CheckpointError(f"{index} names tensor {name} in {fname}, but {where}: re-save the checkpoint with "
                                  "save_pretrained (or correct the index)")


# Tensor names (suffixes) of token embeddings and LM heads in transformers' causal LMs: one row per vocabulary entry.
VOCAB_ROW_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "lm_head.weight", "embed_out.weight")


def check_vocab_rows(cfg_path: Path, config: dict, entries: dict[str, TensorEntry]) -> None:
    """config.json's vocab_size must equal the rows of the embedding and LM head in the files: from_pretrained refuses
    either mismatch only after every rank has started loading (or, with ignore_mismatched_sizes, re-initialises)."""
    vocab = config.get("vocab_size")
    if vocab is None and isinstance(config.get("text_config"), dict):
        vocab = config["text_config"].get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    for name, e in sorted(entries.items()):
        if name.endswith(VOCAB_ROW_SUFFIXES) and len(e.shape) == 2 and e.shape[0] != vocab:
            raise CheckpointError(f"{cfg_path} says vocab_size {vocab} but {name} in {Path(e.file).name} has "
                                  f"{e.shape[0]} rows: set vocab_size to {e.shape[0]}, or re-save the checkpoint with "
                                  "save_pretrained after resizing the embeddings")


def tensor_index(ckpt: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint by name."""
    out: dict[str, TensorEntry] = {}
    for f in weight_files(ckpt):
        out.update(read_safetensors_header(f))
    return out


def read_elements(entry: TensorEntry, start: int, n: int) -> bytes:
    """Bytes of elements [start, start + n) of a tensor, read with one pread (no mapping, no full read)."""
    if n <= 0:
        return b""
    if start < 0 or start + n > entry.numel:
        raise ValueError(f"elements [{start}, {start + n}) are outside tensor {entry.name} ({entry.numel} elements)")
    item = torch.empty((), dtype=entry.dtype).element_size()
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        want = n * item
        buf = os.pread(fd, want, entry.start + start * item)
    finally:
        os.close(fd)
    if len(buf) != want:
        raise CheckpointError(f"{entry.file} is truncated inside tensor {entry.name}: re-copy the file")
    return buf
