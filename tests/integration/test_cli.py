import json
import subprocess
import sys

import pytest

from beam_moe import attach, save_beam
from beam_moe.cli import main
from beam_moe.tiny_models import tiny_model


def test_entry_point_runs_as_a_program():
    result = subprocess.run(
        [sys.executable, "-m", "beam_moe.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("beam-moe ")


def test_info_on_a_model_and_an_adapter(tmp_path, capsys):
    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["supported"] is True
    assert (info["moe_blocks"], info["num_experts"], info["top_k"]) == (2, 8, 2)

    save_beam(attach(model), tmp_path / "adapter")
    assert main(["info", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "beam adapter"
    assert info["config"]["threshold"] == 0.5


def test_bad_input_exits_non_zero_with_a_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "beam_config.json").write_text("{oops")
    assert main(["info", str(tmp_path / "adapter")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
