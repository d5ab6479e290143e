"""Run dpo-dist's init path, then train with the DPOTrainer it hands back (only if every check passed).

    accelerate launch --config_file launch/zero3.yaml --num_processes 8 examples/train_after_init.py my_run.yaml
"""

import sys

from dpo_dist.api import prepare

if __name__ == "__main__":
    result = prepare(sys.argv[1] if len(sys.argv) > 1 else None)
    if not result.passed:
        sys.exit(1)  # the report says which check failed and what to do
    result.trainer.train()
    result.trainer.save_model()
