"""The ``lowrank-opt`` command's error paths: bad input prints one line, ``lowrank-opt COMMAND: error: ...``, on
stderr and exits 2 (as argparse does for bad arguments), never a traceback. The happy paths are in
tests/test_memory.py."""

import pytest

pytest.importorskip("transformers")

from lowrank_opt import cli  # noqa: E402

PREFIX = "lowrank-opt memory: error: "


def error_line(capsys, argv) -> str:
    """Run the command, check it failed the argparse way (exit 2, nothing on stdout, one line on stderr)."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(PREFIX) and "Traceback" not in captured.err
    return captured.err[len(PREFIX):].rstrip("\n")


def test_config_file_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "hidden_size":\n}\n')  # the value is missing: JSON expects one at line 3, column 1
    assert error_line(capsys, ["memory", str(bad)]) == (f"config file '{bad}' is not valid JSON (Expecting value at "
                                                        "line 3, column 1)")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert error_line(capsys, ["memory", str(listed)]) == (f"config file '{listed}' must hold a JSON object of config "
                                                           "fields, got a list")


def test_config_file_that_is_missing_or_a_directory_without_config_json(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    message = error_line(capsys, ["memory", str(missing)])
    assert message.startswith(f"config file '{missing}' not found; give a transformers config JSON file or "
                              "directory, or one of: ") and "llama_tiny" in message
    message = error_line(capsys, ["memory", str(tmp_path)])
    assert message.startswith(f"config directory '{tmp_path}' has no config.json")


def test_config_that_transformers_rejects(tmp_path, capsys):
    odd = tmp_path / "odd_heads.json"
    odd.write_text('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}')
    message = error_line(capsys, ["memory", str(odd)])
    assert message.startswith(f"cannot read config '{odd}': ") and "(64)" in message and "(5)" in message
    unknown_type = tmp_path / "unknown_type.json"
    unknown_type.write_text('{"model_type": "no_such_architecture"}')
    message = error_line(capsys, ["memory", str(unknown_type)])
    assert message.startswith(f"cannot read config '{unknown_type}': ") and "no_such_architecture" in message


@pytest.mark.parametrize("optim", ["apollo", "galore"])
def test_invalid_target_modules_regex(capsys, optim):
    message = error_line(capsys, ["memory", "llama_tiny", "--optim", optim, "--target-modules", "(("])
    assert message.startswith("target_modules '((' is not a valid regular expression (missing ), unterminated "
                              "subpattern at position 1)")


@pytest.mark.parametrize("argv,expected", [
    (["--optim", "adamq"], "unknown optimizer 'adamq'; known: "),
    (["--optim", " , "], "--optim needs at least one optimizer name"),
    (["--optim-args", "rank"], "optim_args must be 'key=value' pairs separated by commas, got 'rank' in 'rank'"),
    (["--optim-args", "rnak=3"], "unknown option(s) 'rnak' for optimizer 'apollo'; valid: "),
    (["--optim", "galore", "--optim-args", "rank=x"], "optim_args rank must be an integer for galore_adamw, got 'x'"),
    (["--optim", "galore", "--optim-args", "scale_type=channel"], "unknown optim_args key(s) 'scale_type' for "
                                                                  "galore_adamw; valid: "),
    (["--optim-args", "cap_tau=1.1"], "optim_args cap_tau need a *_capped optimizer name"),
    (["--num-gpus", "0"], "num_gpus must be >= 1, got 0"),
    (["--optim", "apollo_layerwise", "--num-gpus", "2"], "layer-wise updates run before gradients could be "
                                                         "all-reduced"),
])
def test_bad_optimizer_and_options(capsys, argv, expected):
    assert error_line(capsys, ["memory", "llama_tiny", *argv]).startswith(expected)


def test_a_multi_line_message_is_printed_on_one_line(capsys, monkeypatch):
    from lowrank_opt import memory

    def fails(*args, **kwargs):
        raise ValueError("first line\n\n  second paragraph")

    monkeypatch.setattr(memory, "estimate", fails)
    assert error_line(capsys, ["memory", "llama_tiny"]) == "first line second paragraph"


def test_argparse_errors_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["memory", "llama_tiny", "--dtype", "int4"])
    assert exit_info.value.code == 2
    assert "lowrank-opt memory: error: argument --dtype: invalid choice: 'int4'" in capsys.readouterr().err
