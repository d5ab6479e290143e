"""A diagnostic for bench/bench_init.py --stage-memory (not part of dpo-dist): on this directory in PYTHONPATH, every
`dpo-dist init` rank records, per stage, its resident set at the start and end and the stage's own peak (VmHWM reset
through /proc/self/clear_refs at each stage's start), and writes them to $DPO_DIST_STAGE_MEMORY/rank<R>.json.

It wraps `dpo_dist.init.stages.timed` from outside when that module is first imported (an import hook), so the
product carries no instrumentation and imports nothing earlier than it would."""

import importlib.abc
import importlib.machinery
import json
import os
import sys

OUT = os.environ.get("DPO_DIST_STAGE_MEMORY")


def _kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _wrap(module):
    inner = module.timed
    rows = []
    overall = {"peak_kb": 0}

    def timed(rr, stage, fn, say=None):
        before = _kb("VmHWM")
        overall["peak_kb"] = max(overall["peak_kb"], before)
        rss0 = _kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
            f.write("5")
        try:
            return inner(rr, stage, fn, say)
        finally:
            peak = _kb("VmHWM")
            overall["peak_kb"] = max(overall["peak_kb"], peak)
            rows.append({"stage": stage, "start_kb": rss0, "peak_kb": peak, "end_kb": _kb("VmRSS"),
                         "modules": len(sys.modules)})
            rank = os.environ.get("RANK", "0")
            os.makedirs(OUT, exist_ok=True)
            with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
                json.dump({"stages": rows, "peak_kb": overall["peak_kb"]}, f)

    module.timed = timed


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "dpo_dist.init.stages":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                _wrap(module)

        spec.loader = Loader()
        return spec


if OUT:
    sys.meta_path.insert(0, _Finder())
