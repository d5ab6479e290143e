"""Run dpo-dist's gate, then train with the DPOTrainer it proved (only if every check passed).

    accelerate launch --config_file launch/zero3.yaml --num_processes 8 examples/train_after_init.py my_run.yaml

The same as `dpo-dist init --train --config my_run.yaml` under that launch (docs/training.md): exit 1 when the gate
failed, 5 when training failed after it; the trained policy lands in <output_dir>/final.
"""

import sys

from dpo_dist.api import prepare, train

if __name__ == "__main__":
    result = prepare(sys.argv[1] if len(sys.argv) > 1 else None)
    if not result.passed:
        sys.exit(1)  # the report says which check failed and what to do
    sys.exit(train(result))
