"""The documentation holds together: every relative link and anchor in README.md, CHANGELOG.md and docs/*.md resolves;
docs/config.md is what the schema generates (every key with a meaning); `init --print-config` prints a run's config;
no working notes at the repository root."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from conftest import dpo_dist_cli

from dpo_dist.config import docs as config_docs
from dpo_dist.config import schema

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages written on other branches at the same time; a link to one is not checked while the page is absent.
PENDING = {ROOT / "docs" / "fsdp2.md", ROOT / "docs" / "training.md"}

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# ...` line in a shell script is not a heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text()):
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    found = []
    for i, line in enumerate(prose(page.read_text()), 1):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                found.append((i, target))
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for line, target in links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if dest in PENDING and not dest.exists():
                continue
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}:{line}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}:{line}: {target} (no heading '#{anchor}' in "
                              f"{dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## A `code` heading, with × punctuation\n\n```\n# not a heading\n```\n")
    page.write_text("[ok](b.md#a-code-heading-with--punctuation) [bad](b.md#not-a-heading) [gone](c.md)\n")
    assert anchors(tmp_path / "b.md") == {"title", "a-code-heading-with--punctuation"}
    assert [t for _, t in links(page)] == ["b.md#a-code-heading-with--punctuation", "b.md#not-a-heading", "c.md"]


def test_readme_is_a_guide_not_a_manual():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: move the detail into docs/ (docs/index.md)"
    text = "\n".join(lines)
    for page in ("docs/index.md", "docs/config.md", "docs/troubleshooting.md", "docs/fsdp2.md", "docs/training.md"):
        assert f"]({page}" in text, f"README.md does not link {page}"


def test_no_working_notes_at_the_root():
    notes = sorted(p.name for p in ROOT.glob("NOTES*.md"))
    assert not notes, f"working notes at the repository root: {notes}; what a contributor needs goes in " \
                      "docs/development.md"


# -- docs/config.md: generated from the typed config tree ------------------------------------------------------


def test_every_config_key_has_a_meaning():
    missing = config_docs.missing_meanings()
    assert not missing, (
        f"config keys without a meaning: {', '.join(missing)}. Add one line for each to MEANINGS in "
        f"dpo_dist/config/docs.py (and its range to RANGES if it is not a float), then regenerate the page:\n"
        f"  {config_docs.REGENERATE}")
    stale = config_docs.stale_meanings()
    assert not stale, f"dpo_dist/config/docs.py describes keys the schema no longer has: {', '.join(stale)}"


def test_config_page_matches_the_schema():
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == config_docs.render(), (
        "docs/config.md differs from what dpo_dist/config/schema.py and dpo_dist/config/docs.py generate. "
        f"Regenerate it:\n  {config_docs.REGENERATE}")


def test_config_page_lists_every_key_type_default_and_range():
    page = (ROOT / "docs" / "config.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w.]+)` \|.*$", page, re.M)}
    assert set(rows) == {k for k, _, _ in config_docs.keys()}
    assert "| `train.learning_rate` | number | `1e-06` | > 0 |" in rows["train.learning_rate"]
    assert "[0, 1]" in rows["kl.lr_scale_min"] and "`0.01`" in rows["kl.lr_scale_min"]
    assert "one of `zero3`, `cpu`, `lora`, `precomputed`, `ranks`" in rows["reference.placement"]
    assert ">= 10" in rows["sharding.timeout_s"]


def test_a_new_schema_key_fails_with_how_to_fix(monkeypatch):
    """A key another change adds to schema.py without a meaning is named, with the fix."""
    from dataclasses import dataclass, field, make_dataclass

    @dataclass(frozen=True)
    class Extra:
        new_knob: int = 3

    grown = make_dataclass("RunConfig", [("extra_section", Extra, field(default_factory=Extra))],
                           bases=(schema.RunConfig,), frozen=True)
    monkeypatch.setattr(config_docs.schema, "RunConfig", grown)
    monkeypatch.setattr(config_docs.keys, "__defaults__", (grown, ""))
    assert config_docs.missing_meanings() == ["extra_section.new_knob"]
    assert "`extra_section.new_knob` | integer | `3`" in config_docs.render()


def test_print_config_prints_the_resolved_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  beta: conservative\nkl:\n  limit: 0.2\n")
    out = dpo_dist_cli("init", "--config", str(cfg), "--print-config", "--set", "train.seed=7", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["beta"] == "conservative" and printed["train"]["seed"] == 7
    assert printed["kl"]["limit"] == 0.2 and printed["model"]["path"] == "default"  # YAML, flag and defaults
    assert schema.from_dict(printed) == schema.load(cfg, [(["train", "seed"], 7)])  # it round-trips
    assert not (tmp_path / "runs").exists()  # nothing run, nothing written
