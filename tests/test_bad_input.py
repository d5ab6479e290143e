"""Bad input that used to end in a traceback or a misleading message (issue 13): through the real CLI entry point,
one line `dpo-dist...: <what> (<where>): <fix>`, exit 2, nothing written. Counted in the README ("When it fails")."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import edited_checkpoint

from dpo_dist.cli.main import main


def one_line_exit_2(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dpo-dist"), err
    return lines[0]


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_header(d: Path, fn) -> None:
    """Rewrite model.safetensors' JSON header through `fn`, keeping the tensor bytes (offsets are header-relative)."""
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


# ---------------------------------------------------------------------------------------------------------------
# dpo-dist init: config and checkpoint

def _yaml(tmp, text: bytes):
    p = tmp / "run.yaml"
    p.write_bytes(text)
    return ["--config", str(p)]


def _beta_nan(tmp):
    return ["--set", "train.beta=nan"], "'train.beta' must be a finite number, got nan"


def _kl_limit_inf(tmp):
    return ["--set", "kl.limit=.inf"], "'kl.limit' must be a finite number, got inf"


def _warn_fraction_out_of_range(tmp):
    return ["--set", "kl.warn_fraction=1.5"], "'kl.warn_fraction' must be in (0, 1], got 1.5"


def _override_not_yaml(tmp):
    return ["--set", "train.beta=[1"], "override 'train.beta=[1': the value is not valid YAML"


def _yaml_not_utf8(tmp):
    return _yaml(tmp, b"train:\n  beta: 0.2 # \xff\xfe\n"), "not UTF-8 text (byte 0xff on line 2)"


def _yaml_duplicate_section(tmp):
    return _yaml(tmp, b"train:\n  beta: 0.5\nkl:\n  limit: 0.2\ntrain:\n  seed: 3\n"), \
        "duplicate key 'train' (lines 1 and 5)"


def _model_type_typo(tmp):
    d = edited_checkpoint(tmp)
    edit_json(d / "config.json", lambda c: c.update(model_type="lama"))
    return ["--model", str(d)], "model_type 'lama' is not a model type transformers knows"


def _vocab_larger_than_rows(tmp):
    d = edited_checkpoint(tmp)
    edit_json(d / "config.json", lambda c: c.update(vocab_size=600))
    return ["--model", str(d)], "says vocab_size 600 but lm_head.weight in model.safetensors has 512 rows"


def _vocab_smaller_than_rows(tmp):
    d = edited_checkpoint(tmp)
    edit_json(d / "config.json", lambda c: c.update(vocab_size=500))
    return ["--model", str(d)], "says vocab_size 500 but lm_head.weight"


def _index_weight_map_list(tmp):
    d = edited_checkpoint(tmp)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return ["--model", str(d)], "weight_map must map tensor names to file names"


def _header_bad(mutate, expect):
    def case(tmp):
        d = edited_checkpoint(tmp)
        edit_header(d, lambda h: mutate(h["model.norm.weight"], h))
        return ["--model", str(d)], expect
    case.__name__ = "_header_" + mutate.__name__.strip("_")
    return case


def _offsets_strings(m, h):
    m["data_offsets"] = [str(x) for x in m["data_offsets"]]


def _offsets_negative(m, h):
    m["data_offsets"] = [-2, m["data_offsets"][1] - m["data_offsets"][0] - 2]


def _offsets_one_number(m, h):
    m["data_offsets"] = m["data_offsets"][:1]


def _offsets_not_list(m, h):
    m["data_offsets"] = 7


def _shape_string(m, h):
    m["shape"] = "128"


def _shape_negative(m, h):
    m["shape"] = [-128]


def _shape_float(m, h):
    m["shape"] = [128.0]


def _shape_disagrees_with_offsets(m, h):
    m["shape"] = [64]


def _overlapping(m, h):
    other = h["model.embed_tokens.weight"]["data_offsets"][0]
    size = m["data_offsets"][1] - m["data_offsets"][0]
    m["data_offsets"] = [other, other + size]


HEADERS = [
    _header_bad(_offsets_strings, "data_offsets must be two whole numbers >= 0, got ['"),
    _header_bad(_offsets_negative, "data_offsets must be two whole numbers >= 0, got [-2"),
    _header_bad(_offsets_one_number, "data_offsets must be two whole numbers >= 0"),
    _header_bad(_offsets_not_list, "data_offsets must be two whole numbers >= 0, got 7"),
    _header_bad(_shape_string, "shape must be a list of whole numbers >= 0, got '128'"),
    _header_bad(_shape_negative, "shape must be a list of whole numbers >= 0, got [-128]"),
    _header_bad(_shape_float, "shape must be a list of whole numbers >= 0, got [128.0]"),
    _header_bad(_shape_disagrees_with_offsets, "hold 256 bytes, dtype x shape needs 128"),
    _header_bad(_overlapping, "tensors model.norm.weight and model.embed_tokens.weight overlap"),
]

INIT_CASES = [_beta_nan, _kl_limit_inf, _warn_fraction_out_of_range, _override_not_yaml, _yaml_not_utf8,
              _yaml_duplicate_section, _model_type_typo, _vocab_larger_than_rows, _vocab_smaller_than_rows,
              _index_weight_map_list, *HEADERS]


@pytest.mark.parametrize("case", INIT_CASES, ids=[c.__name__.lstrip("_") for c in INIT_CASES])
def test_init_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    args, cause = case(tmp_path)
    out = tmp_path / "run-out"
    line = one_line_exit_2(["init", *args, "--output-dir", str(out)], capsys)
    assert cause in line, line
    assert not (out / "report.json").exists()


def test_custom_code_model_still_points_at_trust_remote_code(tmp_path, capsys):
    d = edited_checkpoint(tmp_path)
    edit_json(d / "config.json", lambda c: c.update(model_type="my_llm", auto_map={"AutoConfig": "my.Config"}))
    line = one_line_exit_2(["init", "--model", str(d), "--output-dir", str(tmp_path / "o")], capsys)
    assert "needs remote code" in line and "model.trust_remote_code: true" in line


# ---------------------------------------------------------------------------------------------------------------
# dpo-dist launch and plan

@pytest.mark.parametrize("argv, cause", [
    (["--num-processes", "0"], "0 processes per machine (--num-processes): launch at least 1"),
    (["--num-processes", "-2"], "-2 processes per machine (--num-processes)"),
    (["--num-machines", "0"], "0 machines (--num-machines)"),
    (["--num-machines", "2", "--machine-rank", "-1", "--main-process-ip", "10.0.0.1"], "machine rank -1"),
    (["--port", "70000"], "port 70000 is not a TCP port (--port)"),
])
def test_launch_bad_counts_are_one_line(argv, cause, capsys):
    line = one_line_exit_2(["launch", "--dry-run", *argv], capsys)
    assert cause in line, line


@pytest.mark.parametrize("argv, cause", [
    (["--headroom", "-3"], "--headroom -3 is outside [0, 1)"),
    (["--headroom", "5"], "--headroom 5 is outside [0, 1)"),
    (["--headroom", "1"], "--headroom 1 is outside [0, 1)"),
    (["--headroom", "nan"], "--headroom nan is outside [0, 1)"),
    (["--top", "-1"], "--top -1 is below 0"),
    (["--lora-rank", "0"], "--lora-rank 0 is below 1"),
])
def test_plan_out_of_range_arguments_are_refused(argv, cause, capsys):
    line = one_line_exit_2(["plan", *argv], capsys)
    assert line.startswith("dpo-dist plan: ") and cause in line, line


def test_plan_plot_into_a_missing_directory(tmp_path, capsys):
    target = tmp_path / "no" / "such" / "plan.png"
    line = one_line_exit_2(["plan", "--plot", str(target)], capsys)
    assert f"no directory {target.parent} for the plot" in line, line
    assert not target.parent.exists()
