"""Data validation and the chat-template checks at scale: 1,000,000 preference rows, one process, one thread.

    .venv/bin/python bench/bench_data.py                 # 1,000,000 rows, both formats (~1-2 min with generation)
    .venv/bin/python bench/bench_data.py --rows 100000

Writes the rows once (a conversational parquet file, and a standard JSONL file where every 100th prompt is over
max_prompt_length, under
/tmp/dpo-dist-bench/data), then measures, each in a fresh process so the figures do not share caches or heap:
  open+validate  dpo_dist.data.prepare.load_split (the preflight check on every rank): open memory-mapped, check
                 every row;
  template       dpo_dist.data.chat_template.check on the prepared dataset (sampled rows through TRL's helpers);
  prepare        dpo_dist.data.prepare.prepare (standard data: every prompt tokenized once to find the ones over
                 max_prompt_length; a datasets map, cached: the second run reads the cache).
  convert        (JSONL only) the first open: datasets converts the file to Arrow in its cache, once per node.
Each figure: wall seconds, the growth of the process's peak RSS (VmHWM: includes the memory-mapped data pages it
touched, which the kernel shares and can drop) and of its anonymous (heap) memory, over the size before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/dpo-dist-bench/data")


def status_mib(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def hwm_mib() -> float:
    return status_mib("VmHWM")


def make(rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    WORK.mkdir(parents=True, exist_ok=True)
    conv, std = WORK / f"conv-{rows}.parquet", WORK / f"std-{rows}-long1pct.jsonl"
    if not (conv.exists() and std.exists()):
        i = pa.array(range(rows)).cast(pa.string())

        def msgs(role, text):
            return pa.array([[{"role": role, "content": t}] for t in text.to_pylist()])

        q = pa.compute.binary_join_element_wise("Question number ", i, " : what is the answer to it, please?", "")
        good = pa.compute.binary_join_element_wise("The answer to ", i, " is a careful, correct one.", "")
        bad = pa.compute.binary_join_element_wise("No idea about ", i, ".", "")
        table = pa.table({"prompt": msgs("user", q), "chosen": msgs("assistant", good),
                          "rejected": msgs("assistant", bad), "score_chosen": pa.array([8.0] * rows)})
        pq.write_table(table, conv)
        with std.open("w") as f:
            long = "Some background first. " * 150  # every 100th prompt: ~750 tokens, over max_prompt_length 512
            for k, (p, c, r) in enumerate(zip(q.to_pylist(), good.to_pylist(), bad.to_pylist(), strict=True)):
                p = long + p if k % 100 == 0 else p
                f.write(json.dumps({"prompt": p, "chosen": " " + c, "rejected": " " + r}) + "\n")
    return {"conversational parquet": conv, "standard jsonl": std}


def measure(what: str, path: str) -> dict:
    """Run in a child process: one step, its wall time and peak-RSS growth."""
    import datasets

    os.environ.setdefault("HF_DATASETS_CACHE", str(WORK / "hf-cache"))
    datasets.config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
    from transformers import AutoTokenizer

    from dpo_dist.config.schema import from_dict
    from dpo_dist.data import chat_template
    from dpo_dist.data.prepare import load_split, prepare
    from dpo_dist.verify.report import RankReport

    tok = AutoTokenizer.from_pretrained(str(ROOT / "dpo_dist" / "default" / "tiny-sft"))
    cfg = from_dict({})
    from dpo_dist.data.sources import open_source

    if what == "convert":  # a text file's first open: datasets converts it to Arrow in its cache (once per node)
        for built in Path(os.environ["HF_DATASETS_CACHE"]).glob("*/default-*"):
            import shutil

            shutil.rmtree(built)
    else:
        open_source(path, "train", "train")  # the conversion happened before (in preflight)
    base, anon = hwm_mib(), status_mib("RssAnon")
    t0 = time.perf_counter()
    if what == "convert":
        rows = len(open_source(path, "train", "train"))
    elif what == "open+validate":
        ds, fmt, _, _ = load_split(path, "train", "train")
        rows = len(ds)
    elif what.startswith("prepare"):
        rows = prepare(path, "train", "train", tok, cfg.train.max_prompt_length).rows
    else:
        data = prepare(path, "train", "train", tok, cfg.train.max_prompt_length)
        base, anon, t0 = hwm_mib(), status_mib("RssAnon"), time.perf_counter()
        rr = RankReport(0)
        assert chat_template.check(rr, tok, {"train": data}, cfg), [c for c in rr.checks if not c.ok]
        rows = data.rows
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_growth_mib": round(hwm_mib() - base, 1),
            "anon_rss_growth_mib": round(status_mib("RssAnon") - anon, 1), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    files = make(args.rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = {}
    for label, path in files.items():
        for cached in (WORK / "hf-cache").rglob("cache-*.arrow"):  # datasets' map results from an earlier run
            cached.unlink()
        for what in ("convert", "open+validate", "prepare (first)", "prepare (cached)", "template"):
            if (what.startswith("prepare") or what == "convert") and "standard" not in label:
                continue  # conversational prompts are not cut: prepare only selects columns
            res = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--child", what, str(path)],
                                 env=env, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            out[f"{label}: {what}"] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{label:24s} {what:18s} {out[f'{label}: {what}']}", flush=True)
    (ROOT / "bench" / "results_data.json").write_text(json.dumps({"rows": args.rows, "load": os.getloadavg(),
                                                                 "results": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
