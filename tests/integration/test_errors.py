"""What a user sees when something is missing or goes wrong: one line, the fix, a non-zero exit.

Missing optional packages are made unimportable for real (`sys.modules[name] = None`, which is
what Python's import system treats as "not installed") in a fresh `beam-moe` process.
"""

import json
import os
import subprocess
import sys

import pytest

from beam_moe import BeamError, attach, save_beam
from beam_moe.base_models import load_base_model
from beam_moe.cli import main
from beam_moe.errors import require
from beam_moe.experiments.refmoe import corpus
from beam_moe.tiny_models import save_tiny

# argv[1] names the module to hide ("" for none); the rest is the beam-moe command line.
WITHOUT = (
    "import sys; sys.modules.update({sys.argv[1]: None} if sys.argv[1] else {}); "
    "from beam_moe.cli import main; sys.exit(main(sys.argv[2:]))"
)


def beam_moe_without(module: str, *argv: str, env: dict[str, str] | None = None):
    """Run `beam-moe argv` in a fresh process where `module` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, module, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    save_tiny("qwen3_moe", root / "model")
    save_beam(attach(load_base_model(root / "model")), root / "adapter")
    text = [{"text": f"the cat sat on the mat {i} times today"} for i in range(40)]
    (root / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in text))
    return root


def train_args(root, output, *extra):
    return [
        "train", "--model", str(root / "model"), "--data", str(root / "text.jsonl"), "--output",
        str(root / output), "--beta", "0.1", "--max-steps", "1", "--batch-size", "2", "--max-length", "16",
        "--no-progress", *extra,
    ]  # fmt: skip


def assert_one_line(result, command: str, needs: str, extra: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"beam-moe {command}: error: ")
    assert f"needs {needs}, which is not installed" in lines[0]
    assert f"pip install 'beam-moe[{extra}]'" in lines[0]


@pytest.mark.parametrize(
    ("module", "extra_args"),
    [("accelerate", ()), ("peft", ("--train", "lora"))],
    ids=["accelerate", "peft-for-lora"],
)
def test_train_without_the_train_extra_names_it(folders, module, extra_args):
    result = beam_moe_without(module, *train_args(folders, f"run-{module}", *extra_args))
    assert_one_line(result, "train", module, "train")
    assert not (folders / f"run-{module}").exists()


def test_a_saved_dataset_without_datasets_names_the_train_extra(folders):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["the cat sat on the mat"] * 40}).save_to_disk(folders / "saved")
    argv = train_args(folders, "run-datasets")
    argv[argv.index("--data") + 1] = str(folders / "saved")
    assert_one_line(beam_moe_without("datasets", *argv), "train", "datasets", "train")


@pytest.mark.parametrize("command", ["sweep", "analyze", "eval"])
def test_eval_commands_without_the_eval_extra_name_it(folders, command):
    adapter, text, out = (
        str(folders / "adapter"),
        str(folders / "text.jsonl"),
        str(folders / f"{command}-out"),
    )
    module, argv = {
        "sweep": ("matplotlib", ["sweep", adapter, "--ppl", text, "--output", out]),
        "analyze": ("matplotlib", ["analyze", adapter, "--data", text, "--output", out]),
        "eval": ("lm_eval", ["eval", adapter, "--tasks", "beam_wiki_cloze", "--limit", "2"]),
    }[command]
    assert_one_line(beam_moe_without(module, *argv), command, module, "eval")
    assert not (folders / f"{command}-out").exists()


def test_the_triton_backend_without_triton_names_the_kernels_extra():
    argv = ["bench", "layer", "--preset", "olmoe-1b-7b", "--avg-k", "1", "--backend", "triton"]
    assert_one_line(beam_moe_without("triton", *argv), "bench", "triton", "kernels")


def test_tensorboard_asked_for_but_missing_names_the_train_extra(monkeypatch, tmp_path):
    from beam_moe.train.metrics import MetricsLog

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(BeamError, match=r"needs tensorboard, which is not installed.*beam-moe\[train\]"):
        MetricsLog(tmp_path, enabled=True, tensorboard=True)


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BeamError, match=r"needs brokenpkg, which cannot be imported \(No module named"):
        require("brokenpkg", "train", "this")
    assert require("json", "train") is json


# Unexpected errors ----------------------------------------------------------------------------


def _boom(args):
    raise RuntimeError("the first line\nand a second one")


def _refuse(args):
    raise BeamError("--avg-k must be positive")


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import beam_moe.cli.flops

    monkeypatch.setattr(beam_moe.cli.flops, "run", _boom)
    argv = ["flops", "--preset", "olmoe-1b-7b", "--avg-k", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "beam-moe flops: error: unexpected RuntimeError: the first line ... "
        "(rerun with --debug for the traceback)"
    ]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug_argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)")
        assert "in _boom" in err and "RuntimeError: the first line\nand a second one" in err
        assert "rerun with --debug" not in err


def test_a_user_error_exits_2_and_debug_adds_the_traceback(monkeypatch, capsys):
    import beam_moe.cli.flops

    monkeypatch.setattr(beam_moe.cli.flops, "run", _refuse)
    argv = ["flops", "--preset", "olmoe-1b-7b", "--avg-k", "1"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "beam-moe flops: error: --avg-k must be positive\n"
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in _refuse" in err
    assert err.endswith("beam-moe flops: error: --avg-k must be positive\n")


# The quickstart's corpus ----------------------------------------------------------------------


def offline_pip(tmp_path) -> dict[str, str]:
    """pip with no index and no local archives: the download fails fast, as it would offline."""
    (tmp_path / "no-links").mkdir(exist_ok=True)
    return {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path / "no-links")}


def test_quickstart_on_an_unprepared_corpus_says_how_to_prepare_it(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    env = {"BEAM_MOE_DATA_DIR": str(data), **offline_pip(tmp_path)}
    result = beam_moe_without("", "quickstart", "--output", str(tmp_path / "qs"), env=env)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("beam-moe quickstart: error: the reference corpus in ")
    assert "could not download" in message and "No matching distribution" in message
    assert f"python -m beam_moe.experiments.refmoe.corpus prepare --data-dir {data}" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "qs").exists()
    assert not corpus.corpus_is_ready(data)


def test_a_prepared_corpus_is_used_as_it_is(tmp_path, monkeypatch):
    data = tmp_path / "corpus"
    provenance = {p.source: {"requirement": p.requirement, "sha256": p.sha256} for p in corpus.PACKAGES}
    docs = [corpus.Document("some text", "wiki", "Title", held_out=False)]
    corpus.write_corpus(docs, data, provenance)
    for key, value in offline_pip(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert corpus.ensure_prepared(data) == data  # no download tried: pip would fail here
    assert corpus.read_split("train", data) == [{"text": "some text", "source": "wiki", "key": "Title"}]
