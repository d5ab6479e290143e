"""Embedded default assets: a tiny SFT checkpoint, its corpus, and a small preference dataset."""
