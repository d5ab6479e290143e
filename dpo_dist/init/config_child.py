"""A short child Python that rebuilds the run's config and runs a few lines: work whose libraries (datasets, pyarrow:
~100 MiB per process) must never enter a rank before its models load (issue 23.3) runs there instead. Used by the
data check (init.preflight) and the data-length replan (init.plan_length)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_with_config(body: str, cfg) -> subprocess.CompletedProcess:
    """Run `body` in a child process where `cfg` is this run's config (rebuilt with config.schema.from_dict), `json`
    and `sys` imported; its stdout and stderr come back as text."""
    from dpo_dist.config.schema import to_dict

    code = "import json, sys\nfrom dpo_dist.config.schema import from_dict\ncfg = from_dict(json.load(sys.stdin))\n"
    return subprocess.run([sys.executable, "-c", code + body], input=json.dumps(to_dict(cfg), default=str), text=True,
                          capture_output=True)
