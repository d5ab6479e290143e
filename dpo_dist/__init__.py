"""dpo-dist: set up a DPO policy and a frozen reference under DeepSpeed ZeRO, prove they start identical, and hand
back a ready TRL DPOTrainer. Heavy imports (torch, deepspeed, trl) happen inside the commands, not here."""

__version__ = "0.1.0"
