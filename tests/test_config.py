"""Config tree: strict loading, every problem at once, CLI > YAML > defaults."""

import dataclasses

import pytest

from dpo_dist.config.schema import ConfigError, RunConfig, load
from dpo_dist.config.yaml_text import merge_overrides, parse_override


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_match_the_seed():
    cfg = load(None)
    # the demo (embedded model and data) keeps the demo's eval set; a bare DataConfig has none (issue 21, #37)
    assert cfg.data.eval == "default" and RunConfig().data.eval is None
    assert cfg == dataclasses.replace(RunConfig(), data=dataclasses.replace(RunConfig().data, eval="default"))
    t = cfg.train
    assert (t.beta, t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (0.1, 1e-6, 4, 4)
    assert (t.max_length, t.max_prompt_length, t.logging_steps, t.save_steps) == (1024, 512, 10, 100)
    assert cfg.model.dtype == "bfloat16" and cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False
    assert "Explain machine learning in simple terms." in cfg.verify.prompts
    assert cfg.verify.kl_max == 1e-4
    assert cfg.reference.placement == "zero3"


def test_yaml_values_and_scientific_notation(tmp_path):
    cfg = load(write(tmp_path, "train:\n  learning_rate: 5e-7\n  beta: 0.2\nmodel:\n  path: /ckpt\n"))
    assert cfg.train.learning_rate == 5e-7 and cfg.train.beta == 0.2 and cfg.model.path == "/ckpt"


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, "train:\n  betta: 0.1\n  learning_rate: fast\nmodel:\n  dtype: int8\nsharding:\n  stage: 3\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    msgs = e.value.problems
    assert len(msgs) == 4, msgs
    assert any("unknown key 'train.betta'" in m and "did you mean 'train.beta'" in m for m in msgs)
    assert any("'train.learning_rate' must be float" in m for m in msgs)
    assert any("'model.dtype' must be one of" in m for m in msgs)
    assert any("unknown key 'sharding.stage'" in m for m in msgs)
    assert "\n" not in e.value.one_line()


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("train:\n  beta: 0\n", "'train.beta' must be > 0"),
        ("train:\n  learning_rate: -1.0\n", "'train.learning_rate' must be > 0"),
        ("train:\n  max_prompt_length: 1024\n  max_length: 1024\n", "must be < 'train.max_length'"),
        ("train:\n  per_device_train_batch_size: 0\n", "'train.per_device_train_batch_size' must be >= 1"),
        ("train:\n  extra:\n    beta: 0.3\n", "'train.extra.beta' is set by dpo-dist itself (train.beta)"),
        ("reference:\n  placement: ranks\n  ranks: 0\n", "'reference.pad_to_multiple_of' must be >= 1"),
        ("reference:\n  lora:\n    r: 0\n", "'reference.lora' needs r >= 1"),
        ("verify:\n  prompts: []\n", "at least one prompt"),
        ("model: [1, 2]\n", "model: expected a mapping"),
    ],
)
def test_bad_values_are_named(tmp_path, yaml_text, needle):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, yaml_text))
    assert any(needle in m for m in e.value.problems), e.value.problems


def test_cli_overrides_win_over_yaml(tmp_path):
    p = write(tmp_path, "train:\n  beta: 0.2\n  output_dir: /a\n")
    cfg = load(p, [parse_override("train.beta=0.3"), (["train", "output_dir"], "/b")])
    assert cfg.train.beta == 0.3 and cfg.train.output_dir == "/b"
    assert cfg.train.learning_rate == 1e-6  # default untouched


def test_override_syntax_and_merge_does_not_mutate():
    keys, value = parse_override("verify.prompts=[a, b]")
    assert keys == ["verify", "prompts"] and value == ["a", "b"]
    base = {"train": {"beta": 0.1}}
    merged = merge_overrides(base, [(["train", "beta"], 0.5)])
    assert merged["train"]["beta"] == 0.5 and base["train"]["beta"] == 0.1
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(write(tmp_path, "- a\n- b\n"))


def test_model_loader_choice(tmp_path):
    assert load(None).model.loader == "auto"
    assert load(write(tmp_path, "model:\n  loader: transformers\n")).model.loader == "transformers"
    assert load(None, [parse_override("model.loader=fast")]).model.loader == "fast"
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, "model:\n  loader: mmap\n"))
    assert any("'model.loader' must be one of" in m for m in e.value.problems), e.value.problems


# ---------------------------------------------------------------------------------------------------------------
# floats: finite and in range, every problem listed (issue 13.3)

def _float_fields(cls, prefix=""):
    """Every float-typed field of the config tree (a float | Literal union counts), as dotted names."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            out.append(f"{prefix}{f.name}")
    return out


def test_every_float_field_has_a_range():
    from dpo_dist.config.value_checks import FLOAT_RANGES

    assert sorted(_float_fields(RunConfig)) == sorted(FLOAT_RANGES)


@pytest.mark.parametrize("field", _float_fields(RunConfig))
@pytest.mark.parametrize("raw", ["nan", ".nan", "inf", "-.inf", "-Infinity"])
def test_non_finite_floats_are_refused_everywhere(field, raw):
    with pytest.raises(ConfigError) as e:
        load(None, [parse_override(f"{field}={raw}")])
    assert any(f"'{field}' must be a finite number" in m for m in e.value.problems), e.value.problems


def test_non_finite_inside_train_extra_is_refused():
    with pytest.raises(ConfigError) as e:
        load(None, [parse_override("train.extra={max_grad_norm: .nan}")])
    assert e.value.problems == ["'train.extra.max_grad_norm' must be a finite number, got nan"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.beta=-0", "'train.beta' must be > 0"),
        ("train.beta=-0.0", "'train.beta' must be > 0"),
        ("train.learning_rate=-0.0", "'train.learning_rate' must be > 0"),
        ("verify.kl_max=1", "'verify.kl_max' must be in (0, 1)"),
        ("verify.loss_tolerance=0", "'verify.loss_tolerance' must be > 0"),
        ("verify.cross_device_loss_tolerance=-1e-3", "'verify.cross_device_loss_tolerance' must be > 0"),
        ("verify.smoke_learning_rate=0", "'verify.smoke_learning_rate' must be > 0"),
        ("kl.limit=-0.0", "'kl.limit' must be > 0"),
        ("kl.warn_fraction=1.5", "'kl.warn_fraction' must be in (0, 1]"),
        ("kl.lr_scale_min=-0.5", "'kl.lr_scale_min' must be in [0, 1]"),
        ("kl.lr_scale_min=2", "'kl.lr_scale_min' must be in [0, 1]"),
        ("kl.beta_min=5", "'kl.beta_min' (5) must be < 'kl.beta_max' (2)"),
        ("reference.lora.dropout=1", "'reference.lora.dropout' must be in [0, 1)"),
        ("reference.lora.dropout=-0.1", "'reference.lora.dropout' must be in [0, 1)"),
    ],
)
def test_out_of_range_floats_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load(None, [parse_override(override)])
    assert any(needle in m for m in e.value.problems), e.value.problems


def test_every_bad_float_is_listed_at_once(tmp_path):
    p = write(tmp_path, "train:\n  beta: .nan\n  learning_rate: -1\nkl:\n  warn_fraction: 0\n"
                        "reference:\n  lora:\n    dropout: .inf\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert len(e.value.problems) == 2, e.value.problems  # the type pass: both non-finite floats
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, "train:\n  learning_rate: -1\nkl:\n  warn_fraction: 0\n  limit: 0\n"))
    assert len(e.value.problems) == 3, e.value.problems  # the range pass: all three


def test_edge_values_that_are_allowed():
    cfg = load(None, [parse_override(o) for o in ("kl.lr_scale_min=0", "kl.lr_scale_min=1", "kl.warn_fraction=1",
                                                  "reference.lora.dropout=0", "train.beta=aggressive")])
    assert cfg.kl.lr_scale_min == 1.0 and cfg.kl.warn_fraction == 1.0 and cfg.train.beta == "aggressive"


def test_override_that_is_not_yaml_is_one_problem():
    with pytest.raises(ConfigError) as e:
        parse_override("train.beta=[1")
    assert len(e.value.problems) == 1 and "override 'train.beta=[1'" in e.value.problems[0]
    assert "not valid YAML" in e.value.problems[0] and "\n" not in e.value.one_line()


# ---------------------------------------------------------------------------------------------------------------
# strict YAML: duplicate keys and non-UTF-8 bytes (issue 13.6, 13.4)

def test_duplicate_sections_and_keys_are_refused_with_both_lines(tmp_path):
    p = write(tmp_path, "train:\n  beta: 0.2\nmodel:\n  path: x\ntrain:\n  learning_rate: 1e-5\n"
                        "  learning_rate: 2e-5\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.problems == [
        "duplicate key 'train' (lines 1 and 5): keep one, the later one would silently win",
        "duplicate key 'train.learning_rate' (lines 6 and 7): keep one, the later one would silently win",
    ]


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    p = write(tmp_path, "base: &b\n  beta: 0.2\ntrain:\n  <<: *b\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError) as e:  # 'base' is not a section, but the merge itself is no duplicate
        load(p)
    assert not any("duplicate" in m for m in e.value.problems)
    assert load(write(tmp_path, "train: &t\n  beta: 0.2\nkl:\n  limit: 0.2\n")).train.beta == 0.2


def test_non_utf8_yaml_is_named(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"train:\n  beta: 0.2 # caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.problems == ["not UTF-8 text (byte 0xe9 on line 2): save the file as UTF-8"]


def test_sharded_is_the_default_placement_under_either_backend():
    """`sharded` names the reference sharded per layer like the policy (ZeRO-3 partitions, FSDP2 units): read as
    zero3, on the command line too; other names are still refused."""
    from dpo_dist.config.schema import from_dict

    for sharding in ("zero3", "fsdp2"):
        cfg = from_dict({"reference": {"placement": "sharded"}, "sharding": {"name": sharding}})
        assert cfg.reference.placement == "zero3"
    cfg = load(None, [parse_override("reference.placement=sharded")])
    assert cfg.reference.placement == "zero3"
    with pytest.raises(ConfigError, match="reference.placement"):
        from_dict({"reference": {"placement": "shard"}})
