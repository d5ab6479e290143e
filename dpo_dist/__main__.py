"""`python -m dpo_dist ...` (what `accelerate launch -m dpo_dist` runs on every rank)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
