"""What commands write: modes the umask asks for, and one rule (`--output`, `--overwrite`) for replacing."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from beam_moe import attach, save_beam
from beam_moe.atomic import atomic_directory, atomic_write_text
from beam_moe.base_models import load_base_model
from beam_moe.bench.synthetic import build_test_model
from beam_moe.cli import main
from beam_moe.presets import MoEPreset
from helpers.masking import randomize_heads
from helpers.training import model_dir, write_text_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_PRESET = MoEPreset("tiny-qwen3", 64, 32, 8, 2, 0, 1, "qwen3_moe")


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and of every folder and file under it; hard links (a base model's
    weights linked into a merged checkpoint keep their source's mode) are left out."""
    found = {".": root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        info = path.lstat()
        if path.is_file() and info.st_nlink > 1:
            continue
        found[str(path.relative_to(root))] = info.st_mode & 0o777
    return found


def assert_modes(root: Path, folder: int, file: int) -> None:
    wrong = {
        name: oct(mode)
        for name, mode in modes(root).items()
        if mode != (folder if (root / name).is_dir() else file)
    }
    assert not wrong, f"expected folders {oct(folder)} and files {oct(file)} in {root}: {wrong}"


def beam_moe() -> list[str]:
    """The installed `beam-moe` command (it imports beam_moe from PYTHONPATH like this process)."""
    script = Path(sys.executable).parent / "beam-moe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "beam_moe.cli"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    with umask(0o022):
        root = tmp_path_factory.mktemp("outputs")
        model_dir(root / "model")
        model = attach(load_base_model(root / "model"))
        randomize_heads(model, seed=0)
        save_beam(model, root / "adapter")
        write_text_jsonl(root / "text.jsonl", n=24)
    return root


def train_argv(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(root / "model"), "--data", str(root / "text.jsonl"), "--output", str(output),
        "--beta", "0.1", "--max-steps", "1", "--batch-size", "2", "--max-length", "16", "--no-progress",
        "--no-tensorboard", *extra,
    ]  # fmt: skip


def test_published_folders_and_files_follow_the_umask(tmp_path):
    for mask, folder, file in [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]:
        out = tmp_path / f"out-{mask:03o}"
        with umask(mask):
            with atomic_directory(out) as staging:
                (staging / "sub").mkdir()
                (staging / "sub" / "notes.txt").write_text("a")
                save_file({"w": torch.zeros(2)}, staging / "w.safetensors")  # safetensors writes 0600
                with atomic_directory(staging / "nested") as inner:
                    (inner / "b.txt").write_text("b")
            atomic_write_text(out / "written.json", "{}")
        assert_modes(out, folder, file)


def test_a_replaced_folder_or_file_keeps_its_mode(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    kept.chmod(0o750)
    (kept / "old.txt").write_text("old")
    (kept / "old.txt").chmod(0o640)
    with umask(0o022):
        with atomic_directory(kept) as staging:
            (staging / "new.txt").write_text("new")
        atomic_write_text(kept / "old.txt", "rewritten")
    assert modes(kept) == {".": 0o750, "old.txt": 0o640, "new.txt": 0o644}
    assert (kept / "old.txt").read_text() == "rewritten"


def test_analyze_into_an_existing_folder_keeps_its_mode(folders, tmp_path, capsys):
    out = tmp_path / "analysis"
    out.mkdir()
    out.chmod(0o755)
    with umask(0o022):
        argv = ["analyze", str(folders / "adapter"), "--data", str(folders / "text.jsonl"), "-o", str(out)]
        assert main([*argv, "--max-tokens", "64", "--heatmap-tokens", "8"]) == 0, capsys.readouterr().err
    assert_modes(out, 0o755, 0o644)


def test_train_in_a_subprocess_and_export_publish_what_the_umask_allows(folders, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*beam_moe(), *train_argv(folders, run, "--max-steps", "2", "--save-every", "1")]
    with umask(0o022):
        first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert list((run / "checkpoints").glob("step-*")), "a checkpoint is among what is checked"
    assert_modes(run, 0o755, 0o644)

    # The real command refuses to replace the finished run without --overwrite, and leaves it as it was.
    adapter = (run / "beam_adapter.safetensors").read_bytes()
    with umask(0o022):
        again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr
    assert (run / "beam_adapter.safetensors").read_bytes() == adapter

    for mask, folder, file in [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]:
        merged = tmp_path / f"merged-{mask:03o}"
        with umask(mask):
            assert main(["export", str(run), "--output", str(merged)]) == 0, capsys.readouterr().err
        assert_modes(merged, folder, file)


def refuse_then_replace(output: Path, run, marker: str) -> None:
    """`run(overwrite)` writes `output`: a second run is refused without --overwrite and leaves the
    earlier result as it was; with --overwrite it replaces the folder as a whole."""
    assert run(False) == 0
    (output / "stale.txt").write_text("from the earlier run")
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert run(False) == 2
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    assert run(True) == 0
    assert (output / marker).is_file() and not (output / "stale.txt").exists()


@pytest.mark.parametrize("command", ["train", "export", "sweep", "analyze"])
def test_a_second_run_into_the_same_folder_needs_overwrite(folders, tmp_path, capsys, command):
    out = tmp_path / command
    adapter, text = str(folders / "adapter"), str(folders / "text.jsonl")
    argv, marker = {
        "train": (train_argv(folders, out), "beam_config.json"),
        "export": (["export", adapter, "-o", str(out)], "config.json"),
        "sweep": (
            ["sweep", adapter, "--ppl", text, "-o", str(out), "--baselines", "top_k", "--points", "2"],
            "sweep.json",
        ),
        "analyze": (
            [
                "analyze",
                adapter,
                "--data",
                text,
                "-o",
                str(out),
                "--max-tokens",
                "64",
                "--heatmap-tokens",
                "8",
            ],
            "summary.json",
        ),
    }[command]
    errors = []

    def run(overwrite: bool) -> int:
        code = main([*argv, *(["--overwrite"] if overwrite else [])])
        errors.append(capsys.readouterr().err)
        return code

    refuse_then_replace(out, run, marker)
    assert "--overwrite" in errors[1], errors[1]

    # A folder this command did not write is refused even with --overwrite, and left alone.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*[str(other) if a == str(out) else a for a in argv], "--overwrite"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_make_model_needs_overwrite_to_replace_a_test_model(tmp_path, capsys):
    out = tmp_path / "model"

    def run(overwrite: bool) -> int:
        if not overwrite and out.exists():  # the CLI refuses before it builds anything
            code = main(["bench", "make-model", "--output", str(out), "--layers", "1"])
            assert "pass --overwrite" in capsys.readouterr().err
            return code
        build_test_model(
            out, TINY_PRESET, num_layers=1, dtype=torch.float32, calibration_tokens=128, overwrite=overwrite
        )
        return 0

    refuse_then_replace(out, run, "adapter/beam_config.json")


def test_single_file_outputs_are_replaced_only_with_overwrite(folders, tmp_path, capsys):
    result = tmp_path / "eval.json"
    result.write_text("earlier result\n")
    eval_argv = ["eval", str(folders / "adapter"), "--ppl", str(folders / "text.jsonl"), "-o", str(result)]
    assert main(eval_argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    for bench in (
        ["layer", "--preset", "qwen3-30b-a3b", "--avg-k", "1"],
        ["generate", str(folders / "adapter")],
    ):
        assert main(["bench", *bench, "--output", str(result)]) == 2
        assert "pass --overwrite" in capsys.readouterr().err
    assert result.read_text() == "earlier result\n"
    assert main([*eval_argv, "--overwrite"]) == 0
    assert json.loads(result.read_text())["routing"] == {"method": "beam"}
    assert main(["eval", str(folders / "adapter"), "-o", str(tmp_path), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_every_command_that_writes_names_its_output_the_same_way():
    from beam_moe.cli import build_parser

    parser = build_parser()
    writers = {
        ("train",): True, ("export",): True, ("quickstart",): True, ("sweep",): True, ("analyze",): True,
        ("bench", "make-model"): True, ("eval",): False, ("bench", "layer"): False, ("bench", "generate"): False,
    }  # fmt: skip
    for command, folder in writers.items():
        sub = parser
        for name in command:
            sub = next(a for a in sub._actions if a.dest in ("command", "bench_command")).choices[name]
        options = {o: a for a in sub._actions for o in a.option_strings}
        assert options["--output"] is options["-o"], command
        assert "--overwrite" in options and "--out" not in options, command
        assert options["--output"].metavar == ("DIR" if folder else "FILE"), command
