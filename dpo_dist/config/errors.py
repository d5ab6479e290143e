"""The one exception a config problem raises: every problem found, reported at once (torchtune's ConfigError), so a
user fixes their YAML in one go. Its own module because both halves of reading a config raise it: the YAML text
(config.yaml_text) and the typed tree (config.schema)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")

    def one_line(self) -> str:
        return f"invalid {self.source}: " + "; ".join(self.problems)
