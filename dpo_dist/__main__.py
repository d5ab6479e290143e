"""`python -m dpo_dist ...` (what `accelerate launch -m dpo_dist` runs on every rank)."""

import os
import sys

from dpo_dist.cli.main import main

if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the foreground group: the launcher says it, once
        code = 130
    # Leave without interpreter finalization: with gloo, DeepSpeed and TRL loaded, C++ objects with live threads
    # were destroyed at exit and aborted a rank now and then ("terminate called without an active exception",
    # SIGABRT) after the report was written and the process group torn down, turning a passed gate into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
