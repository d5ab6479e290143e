"""A run YAML read as text, strictly: UTF-8, valid YAML, no key given twice, no alias bomb, and the command line's
`section.key=value` overrides merged over it. What the values mean is config.schema's; this module knows only text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dpo_dist.config.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError([f"override '{item}' must look like section.key=value"], "command line")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override '{item}': the value is not valid YAML ({_yaml_cause(e)}): close the "
                           "bracket or brace, or quote a value meant as text"], "command line") from None
    return key.strip().split("."), value


def _yaml_cause(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    return problem if problem else str(e).splitlines()[0]


def _duplicates(node: yaml.Node, prefix: str, out: list[str], seen_nodes: set[int] | None = None) -> None:
    """Keys given twice in one mapping, with both lines: PyYAML keeps the later value silently (two `train:` sections
    would drop the first one's settings). Each node once: an alias is the node it names, so nested aliases (a
    "billion laughs" file) would otherwise be walked exponentially often (#10)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` overrides on purpose
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                out.append(f"duplicate key '{prefix}{key}' (lines {seen[key]} and {line}): keep one, the later one "
                           "would silently win")
            else:
                seen[key] = line
            _duplicates(value_node, f"{prefix}{key}.", out, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{prefix}{i}.", out, seen_nodes)


MAX_YAML_VALUES = 100_000  # a run config holds hundreds; every later copy of it (to_dict, the report) walks them all


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values the document holds once every alias is copied out (what to_dict and the report would walk),
    counted in linear time: an alias is its node, counted once and reused."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    children = [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    memo[id(node)] = 1 + sum(_expanded_size(c, memo) for c in children)
    return memo[id(node)]


def read_yaml(p: Path, source: str) -> Any:
    """Parse a YAML file strictly: UTF-8 text, valid YAML, no key given twice in one mapping."""
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError([f"not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}): save the file as UTF-8"],
                          source) from None
    except OSError as e:
        raise ConfigError([f"cannot read it ({e.strerror or e}): check its permissions"], source) from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # inside the try: its reader refuses control characters right here (#9)
        node = loader.get_single_node()
        if node is None:
            return None
        dups: list[str] = []
        _duplicates(node, "", dups)
        if dups:
            raise ConfigError(dups, source)
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise ConfigError([f"expands to {size:,} values through aliases (*name), more than {MAX_YAML_VALUES:,}: "
                               "a run config is never that large (an alias bomb?): write the values out"], source)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise ConfigError([f"not a YAML text file: {e.reason} #x{e.character:04x} on line {line}: remove it, or pass "
                           "the run YAML, not another file"], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {str(e).splitlines()[0]}"], source) from None
    finally:
        if loader is not None:
            loader.dispose()


def merge_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Apply dotted overrides on a nested dict (CLI wins over YAML)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for keys, value in overrides:
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out
