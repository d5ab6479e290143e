"""A full disk names the file it stopped, and leaves nothing half-written (issue 13: report, manifest, precomputed
log-prob cache, SLURM job files). ENOSPC is injected where the OS would raise it; everything else is real."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, dpo_dist_cli

from dpo_dist.verify import manifest

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_manifest_on_a_full_disk_names_its_path_and_leaves_nothing(tmp_path, monkeypatch):
    from dpo_dist.verify import report

    def full(fd):
        raise ENOSPC

    monkeypatch.setattr(report.os, "fsync", full)
    with pytest.raises(OSError) as e:
        manifest.write_manifest(tmp_path, checkpoint="c", placement="zero3", tokenizer="t", fingerprints={"w": "1"},
                                config={}, run_id="r1")
    assert e.value.errno == errno.ENOSPC and str(tmp_path / manifest.MANIFEST) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_manifest_carries_the_run_id(tmp_path):
    manifest.write_manifest(tmp_path, checkpoint="c", placement="zero3", tokenizer="t", fingerprints={}, config={},
                            run_id="20261201T000000Z-abcd")
    assert json.loads((tmp_path / manifest.MANIFEST).read_text())["run_id"] == "20261201T000000Z-abcd"


def test_cache_write_interrupted_by_a_full_disk_leaves_no_truncated_file(tmp_path, monkeypatch):
    """The map TRL's _precompute_ref_logps runs (cache_file_name next to the dataset), under the guard
    PrecomputedDPOTrainer puts around it. The disk fills after the first batch: every later write and the writer's
    own clean-up fail, as they do on a real full disk."""
    from datasets import Dataset, load_from_disk
    from datasets.arrow_writer import ArrowWriter

    from dpo_dist.runtime.disk_writes import no_leftovers

    Dataset.from_list([{"prompt": f"p{i}"} for i in range(64)]).save_to_disk(str(tmp_path / "data"))
    ds = load_from_disk(str(tmp_path / "data"))
    cache = ds._get_cache_file_path("f00d")
    before = sorted(os.listdir(tmp_path / "data"))
    real_write = ArrowWriter.write_batch
    calls = {"n": 0}

    def write_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise ENOSPC
        return real_write(self, *a, **k)

    def finalize(self, *a, **k):
        raise ENOSPC

    monkeypatch.setattr(ArrowWriter, "write_batch", write_batch)
    monkeypatch.setattr(ArrowWriter, "finalize", finalize)

    def cache_logps():
        ds.map(lambda b, idx: {"ref_chosen_logps": [float(i) for i in idx]}, with_indices=True, batched=True,
               batch_size=8, remove_columns=ds.column_names, new_fingerprint="f00d", cache_file_name=cache)

    with pytest.raises(OSError):  # without the guard: datasets leaves its truncated temporary file
        cache_logps()
    leftover = sorted(set(os.listdir(tmp_path / "data")) - set(before))
    assert leftover and all(n.startswith("tmp") for n in leftover), leftover
    for n in leftover:
        (tmp_path / "data" / n).unlink()

    with pytest.raises(OSError) as e, no_leftovers(tmp_path / "data", cache, "caching reference log-probs"):
        cache_logps()
    assert e.value.errno == errno.ENOSPC and cache in str(e.value) and "caching reference log-probs" in str(e.value)
    assert sorted(os.listdir(tmp_path / "data")) == before  # no temporary file, no cache file


def test_precomputed_trainer_guards_its_cache_write(tmp_path, monkeypatch):
    """The guard is on the method TRL calls: PrecomputedDPOTrainer._precompute_ref_logps, run with the disk filling
    inside TRL's own precompute (which writes its cache through a temporary file next to the data, as datasets' map
    does above), names the cache file and leaves no temporary file behind."""
    from trl import DPOTrainer

    from dpo_dist.reference import trainers
    from dpo_dist.reference.trainers import PrecomputedDPOTrainer

    assert "_precompute_ref_logps" in vars(DPOTrainer)  # the hook we override is TRL's
    cache = str(tmp_path / "cache-f00d.arrow")
    monkeypatch.setattr(trainers.trl_compat, "key_precompute_cache", lambda trainer, ds, digest, key: cache)

    def trl_precompute_on_a_full_disk(self, dataset, name, batch_size):
        with open(tmp_path / "tmpab12cd", "wb") as f:  # datasets' temporary cache file, truncated
            f.write(b"partial")
        raise ENOSPC

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", trl_precompute_on_a_full_disk)
    trainer = object.__new__(PrecomputedDPOTrainer)  # the real class; its __init__ needs models and data
    trainer._reference_digest, trainer._data_keys = "digest", {"train": "rows"}
    trainer.cache_hits, trainer.precompute_batch_size = {}, None
    with pytest.raises(OSError) as e:
        trainer._precompute_ref_logps(object(), "train", 8)
    assert e.value.errno == errno.ENOSPC and cache in str(e.value)
    assert "caching reference log-probs for train" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no truncated temporary file, no cache file


def test_slurm_job_files_that_cannot_be_written_are_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = dpo_dist_cli("slurm", "--cpu", "--output-dir", str(tmp_path / "run"), "--script",
                       str(blocker / "job.sbatch"), env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("dpo-dist: could not write the job files (")
    assert str(blocker) in out.stderr and "Traceback" not in out.stderr
    assert not Path(blocker.parent / "job.config.yaml").exists()
