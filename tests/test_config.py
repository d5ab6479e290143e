"""Config tree: strict loading, every problem at once, CLI > YAML > defaults."""

import pytest

from dpo_dist.config import ConfigError, RunConfig, load, merge_overrides, parse_override


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_match_the_seed():
    cfg = load(None)
    assert cfg == RunConfig()
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
        ("train:\n  extra:\n    beta: 0.3\n", "'train.extra' must not set beta"),
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
