"""Where preference data comes from: a file (.jsonl, .json, .parquet, .csv, .arrow), a `datasets` directory, or the
name of a dataset already in the local Hugging Face cache. Every source opens as a memory-mapped `datasets.Dataset`
(Arrow on disk), never as Python lists of every row.

Errors are DataError with one line naming the source (and row or split) and the fix.
"""

from __future__ import annotations

import codecs
import errno
import os
from pathlib import Path

from dpo_dist.config.resources import resolve_data_path

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
CHUNK = 1 << 24  # bytes read at a time by the UTF-8 scan


class DataError(ValueError):
    """A dataset that cannot be trained on, with the fix in the message."""


def quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: a reader's failure is logged as an ERROR above the DataError line that names it better
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).suffix.lower() in BUILDERS or spec.count("/") > 1


def is_dataset_name(spec: str, base: Path) -> bool:
    """A name to look up in the Hugging Face cache (not a path relative to `base`): what open_source would do."""
    return spec != "default" and not (base / spec).expanduser().exists() and not looks_like_path(spec)


def open_source(spec: str, role: str, split: str):
    """The `split` of data.<role> (`spec`) as a Dataset. Single-split sources (files, a saved Dataset) ignore
    `split`: they are the split."""
    quiet_datasets()
    if not str(spec).strip():
        raise DataError(f"data.{role} is empty: set it to a data file (.jsonl, .json, .parquet, .csv, .arrow), a "
                        "`datasets` directory, or a dataset name in the local Hugging Face cache")
    path = resolve_data_path(spec, role)
    if path.exists():
        try:
            return open_dir(path, role, split) if path.is_dir() else open_file(path, role)
        except OSError as e:  # permissions, a vanished file: datasets' own errors are wrapped below
            raise DataError(f"data.{role} {path} cannot be read ({e.strerror or e}): check it exists and is "
                            "readable by this user on every node") from None
    if looks_like_path(spec):
        raise DataError(f"data.{role} {path} does not exist: check data.{role} (a .jsonl, .json, .parquet, .csv or "
                        ".arrow file, a `datasets` directory, or a dataset name in the local Hugging Face cache)")
    return open_cached_name(spec, role, split)


def pick_split(splits: list[str], split: str, where: str, role: str) -> None:
    if split not in splits:
        raise DataError(f"data.{role} {where} has no split {split!r} (splits: {', '.join(splits)}): set "
                        f"data.{role}_split to one of them")


def open_dir(path: Path, role: str, split: str):
    from datasets import load_from_disk

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(f"data.{role} {path} is a directory but not a `datasets` directory (no dataset_dict.json or "
                        "state.json): point it at a data file, or a directory written by save_to_disk")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # a damaged save: datasets raises several kinds
        raise DataError(f"data.{role} {path} cannot be read as a `datasets` directory ({one_line(e)}): write it "
                        "again with save_to_disk") from None
    if hasattr(ds, "keys"):  # a DatasetDict
        pick_split(list(ds.keys()), split, str(path), role)
        ds = ds[split]
    return ds


def open_file(path: Path, role: str):
    suffix = path.suffix.lower()
    builder = BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"data.{role} {path} has extension {suffix or '(none)'!r}, not one dpo-dist reads: use "
                        f"{', '.join(BUILDERS)} (or a `datasets` directory)")
    if path.stat().st_size == 0:
        raise DataError(f"the {role} dataset is empty (data.{role} {path}): it needs rows with chosen and "
                        "rejected (and a prompt)")
    if suffix in TEXT_SUFFIXES:
        check_utf8(path, role)
    try:
        if builder == "arrow":
            from datasets import Dataset

            return Dataset.from_file(str(path))  # memory-mapped in place, no copy into the cache
        from datasets import load_dataset

        # datasets converts the file to Arrow once in its cache (a file lock lets concurrent ranks share that work)
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        cache = cache_write_error(e, path)
        if cache is not None:
            raise DataError(f"the datasets cache {cache_root()} cannot be written ([Errno {cache.errno}] "
                            f"{cache.strerror}) while data.{role} {path} is converted to Arrow: set HF_DATASETS_CACHE "
                            "to a writable directory with free space on every node") from None
        if "corresponds to no data" in str(e):  # datasets' words for a readable file without rows
            raise DataError(f"the {role} dataset is empty (data.{role} {path}): it needs rows with chosen and "
                            "rejected (and a prompt)") from None
        raise DataError(f"data.{role} {path} cannot be read as {suffix} ({read_error(path, e)}): fix the file or "
                        "give it the extension of its real format") from None


CACHE_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT)


def cache_write_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError, anywhere in the chain, of datasets failing to write its Arrow cache (read-only, full, no
    permission: common with a shared cluster cache), not of reading the data file itself (issue 21, #25)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in CACHE_ERRNOS and str(x.filename or "") != str(path):
            return x
        x = x.__cause__ or x.__context__
    return None


def check_utf8(path: Path, role: str) -> None:
    """Arrow's JSON and CSV readers take invalid UTF-8 bytes into string columns, which fail later, deep inside
    training, so text files are scanned first (in chunks: bounded memory)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, seen = 1, 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                at, newline = e.start, b"\n"
                raise DataError(f"data.{role} {path}:{line + chunk[:at].count(newline)} has bytes that are not "
                                f"UTF-8 (at byte {seen + at}): re-encode the file as UTF-8") from None
            line += chunk.count(b"\n")
            seen += len(chunk)
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"data.{role} {path}:{line} ends inside a UTF-8 character: re-encode the file as UTF-8") \
            from None


def read_error(path: Path, e: Exception) -> str:
    """The reader's complaint, with the line named for JSON Lines (the Arrow reader counts rows from the block)."""
    cause = e.__cause__ or e.__context__ or e
    if path.suffix.lower() == ".jsonl":
        import json

        with path.open(encoding="utf-8") as f:
            for lineno, text in enumerate(f, 1):
                if text.strip():
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as je:
                        return f"line {lineno} is not valid JSON: {je.msg}"
                    if not isinstance(row, dict):  # datasets names "row 0" of its block, not the line
                        kind = "an array" if isinstance(row, list) else f"a {type(row).__name__}"
                        return f"line {lineno} is {kind}, not a JSON object: each line must be one row, {{...}}"
    return one_line(cause)


def one_line(e: BaseException) -> str:
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text[:300] or type(e).__name__


def cache_root() -> Path:
    import datasets

    return Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)))


def open_cached_name(name: str, role: str, split: str):
    """A hub dataset that `load_dataset(name)` stored in the local cache earlier, read offline with datasets' own
    cache builder (what load_dataset itself uses when offline): never a network call from a training job."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    where = cache_root() / "___".join(parts)
    if not any(p.is_dir() for p in where.glob("*/*/*")):
        raise DataError(f"data.{role} {name!r} is not a file or directory, and no dataset of that name is in the "
                        f"local Hugging Face cache ({where} is absent): download it first with "
                        f"datasets.load_dataset({name!r}) on a machine with network access, or give a path")
    try:
        builder = Cache(cache_dir=str(cache_root()), dataset_name=name.split("/")[-1], repo_id=name, version="auto",
                        hash="auto")
        splits = list(builder.info.splits or {})
        pick_split(splits, split, f"{name!r} (cached in {where})", role)
        return builder.as_dataset(split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data.{role} {name!r} is in the cache ({where}) but cannot be read ({one_line(e)}): "
                        "download it again with datasets.load_dataset") from None


def demo_note(model_path: str, train: str) -> str | None:
    """A user's model on the embedded demo train set (data.train unset or `default`): allowed, since a first init
    that only proves policy == reference needs no data of its own, but said on the terminal and in the report, since
    the trainer handed back would train on 64 demo rows (issue 21, #37)."""
    if train != "default" or model_path == "default":
        return None
    return ("data.train is the embedded 64-row demo set, not your data (data.train unset): set data.train to your "
            "preference data before training")
