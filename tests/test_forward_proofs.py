"""Issue 23 and issue 21 #81/#12: the forward proofs share forwards (at most a dozen full-model forwards where there
were about thirty), the run records what each proof ran and it equals the prediction `init --dry-run` prints, each
proof has its own switch and a switched-off proof is a SKIPPED row, and an empty reference answer is a config error."""

from __future__ import annotations

import pytest
from conftest import dpo_dist_cli, init_single

from dpo_dist.config.schema import ConfigError, from_dict
from dpo_dist.plan.forwards import planned_forwards

ENV = {"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def init(tmp_path, *args: str) -> tuple[int, str, dict]:
    code, log, rep = init_single(tmp_path / "out", "--overwrite", *args, env=ENV)
    return code, log, rep or {}


def row(rep: dict, name: str) -> dict:
    rows = [r for r in rep["checks"] if r["check"] == name]
    assert rows, f"no row {name!r}: {[r['check'] for r in rep['checks']]}"
    return rows[0]


@pytest.mark.parametrize("world", [1, 2, 8, 64])
@pytest.mark.parametrize("deterministic", [True, False])
def test_default_proofs_plan_at_most_a_dozen_forwards(world, deterministic):
    plan = planned_forwards(from_dict({}).verify, world, deterministic)
    assert plan.total <= 12, plan.describe()
    assert plan.counts["self-noise (policy, repeat)"] == (0 if deterministic else 1)


def test_empty_reference_text_is_a_config_error_not_an_untrained_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="reference_text"):
        from_dict({"verify": {"reference_text": "  "}})
    from_dict({"verify": {"reference_text": "", "perplexity": False}})  # nothing measures it then
    res = dpo_dist_cli("init", "--output-dir", str(tmp_path / "o"), "--set", "verify.reference_text=", env=ENV)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "verify.reference_text" in res.stderr and "untrained" not in res.stderr


def test_dry_run_prints_the_forward_count_per_proof():
    res = dpo_dist_cli("init", "--dry-run", "--set", "verify.max_new_tokens=5", env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "forward proofs: " in res.stdout and "generation: 5" in res.stdout


def test_run_records_the_planned_forwards_and_skips_show(tmp_path, deep_checkpoint):
    """One world-of-one run on the deep trained checkpoint with every proof on: what ran equals the plan, at most a
    dozen; then generation off (#81: perplexity and the tokenizer proof still run) and the order probe off: SKIPPED
    rows with the reason."""
    code, log, rep = init(tmp_path, "--model", str(deep_checkpoint))
    assert code == 0, log[-3000:]
    counts = rep["facts"]["forward_counts"]
    plan = planned_forwards(from_dict({}).verify, 1, deterministic=True)
    assert {k: v for k, v in plan.counts.items() if v} == counts, (counts, plan.counts)
    assert sum(counts.values()) <= 12
    assert "forward proofs: tokenizer order" in log  # progress: which proof runs
    code, log, rep = init(tmp_path, "--model", str(deep_checkpoint), "--set", "verify.generation=false", "--set",
                          "verify.tokenizer_order=false")
    assert code == 0, log[-3000:]
    assert row(rep, "perplexity below uniform")["ok"] and not row(rep, "perplexity below uniform").get("skipped")
    for name, key in (("generation: not degenerate", "generation"), ("tokenizer matches the weights",
                                                                     "tokenizer_order")):
        r = row(rep, name)
        assert r.get("skipped") and f"verify.{key}: false" in r["value"], r
    assert "SKIPPED" in log
    assert sum(rep["facts"]["forward_counts"].values()) == 2  # the verify pass and the reference's forward


def test_load_progress_says_bytes_read_of_the_total_and_the_rate(tmp_path):
    """Issue 23.6: a long load prints how far it is on rank 0's terminal (here: a read of 2 MiB, ticks of 0.1 s)."""
    import time

    from dpo_dist.init import progress

    f = tmp_path / "x.bin"
    f.write_bytes(b"\0" * (2 << 20))
    lines: list[str] = []
    with progress.reading("loading policy", 4 << 20, lines.append, every=0.1):
        for _ in range(5):
            f.read_bytes()
            time.sleep(0.08)
    assert lines and "of ~0.00 GiB read on this rank" in lines[-1] and "MiB/s" in lines[-1]
    quiet: list[str] = []
    with progress.reading("loading policy", 4 << 20, quiet.append, every=5.0):
        pass
    assert not quiet  # a short stage says nothing
