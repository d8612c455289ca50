"""What the commands say: missing folders, dense models, base-model and checkpoint reports, Ctrl-C, context."""

import _thread
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from beam_moe import attach, save_beam
from beam_moe.base_models import load_base_model
from beam_moe.cli import build_parser, main
from beam_moe.cli.train import config_from_args
from beam_moe.tiny_models import byte_tokenizer
from beam_moe.train.checkpointing import checkpoint_dirs
from beam_moe.train.output import check_output
from helpers.masking import randomize_heads
from helpers.training import model_dir, write_text_jsonl

BEAM_MOE = str(Path(sys.executable).with_name("beam-moe"))


def beam_moe(*argv):
    """The real `beam-moe` command in a subprocess, one thread and offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([BEAM_MOE, *map(str, argv)], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("messages")
    model_dir(path / "model")
    write_text_jsonl(path / "text.jsonl", n=40)
    model = attach(load_base_model(path / "model"))
    randomize_heads(model, seed=0)
    save_beam(model, path / "adapter")
    return path


def train_args(root, output, *extra):
    return [
        "train", "--model", str(root / "model"), "--data", str(root / "text.jsonl"), "--output",
        str(root / output), "--beta", "0.1", "--batch-size", "2", "--max-length", "32", "--no-progress", *extra,
    ]  # fmt: skip


def test_a_missing_model_folder_is_no_such_folder(root):
    result = beam_moe(*train_args(root, "nowhere-run"), "--model", root / "nope")
    assert result.returncode == 2, result.stderr
    assert f"no such folder: {root / 'nope'}" in result.stderr
    assert "Repo id" not in result.stderr
    assert not (root / "nowhere-run").exists()


def test_an_adapter_whose_base_moved_says_so(root, capsys, tmp_path):
    base = tmp_path / "moved"
    model = attach(load_base_model(model_dir(base)))
    save_beam(model, tmp_path / "adapter")
    base.rename(tmp_path / "elsewhere")
    assert main(["eval", str(tmp_path / "adapter"), "--ppl", str(root / "text.jsonl"), "--json"]) == 2
    err = capsys.readouterr().err
    assert f"no such folder: {base}" in err and "pass --model" in err and "Repo id" not in err
    assert main(["export", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    assert f"no such folder: {base}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense(root):
    """A dense (Llama) model folder whose weights file is garbage: only its config can be read."""
    from transformers import LlamaConfig

    path = root / "llama"
    path.mkdir()
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=261
    ).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def test_a_dense_model_is_refused_from_its_config(root, dense, capsys):
    result = beam_moe(*train_args(root, "dense-run"), "--model", dense)
    assert result.returncode == 2, result.stderr
    assert "does not support model type 'llama'" in result.stderr
    assert "safetensors" not in result.stderr, "refused before the weights are read"
    assert not (root / "dense-run").exists()
    assert main(["eval", str(dense), "--ppl", str(root / "text.jsonl")]) == 2
    assert "does not support model type 'llama'" in capsys.readouterr().err


def test_eval_of_an_adapter_shows_the_base_perplexity_beside_it(root):
    output = root / "adapter-eval.json"
    result = beam_moe(
        "eval", root / "adapter", "--ppl", root / "text.jsonl", "--max-length", "128", "--output", output
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(output.read_text())
    base, beam = document["base_perplexity"], document["perplexity"]
    assert base["scored_tokens"] == beam["scored_tokens"]
    assert base["ppl"] != beam["ppl"], "the randomised heads drop experts"
    assert document["ppl_change_vs_base"] == pytest.approx(beam["ppl"] / base["ppl"] - 1)
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert f"{base['ppl']:.4f}" in lines["base"]
    assert f"BEAM {document['ppl_change_vs_base']:+.2%}" in lines["base"]
    assert lines["routing"].split(None, 1)[1] == "BEAM mask heads"


def test_eval_of_a_base_model_is_a_base_model_report(root, capsys):
    argv = ["eval", str(root / "model"), "--ppl", str(root / "text.jsonl")]
    assert main([*argv, "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    assert "BEAM" not in out and "saved" not in out and "-" not in out.split("MoE FLOPs")[1]
    assert "the base model's own" in out
    assert main([*argv, "--max-length", "128", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["routing"] == {"method": "base"}
    assert document["flops"]["moe_flops_reduction"] == 0.0
    assert "base_perplexity" not in document, "the base model is not evaluated twice"

    # The tiny model's context is 256 tokens: longer windows are measured, with a warning.
    assert main([*argv, "--max-length", "300", "--json"]) == 0
    err = capsys.readouterr().err
    assert "--max-length 300 is longer than the model's context (256 tokens" in err
    assert "beam-moe eval: warning: --max-length 300" in err


def test_no_base_skips_the_base_pass(root, capsys):
    argv = ["eval", str(root / "adapter"), "--ppl", str(root / "text.jsonl"), "--max-length", "128"]
    assert main([*argv, "--no-base", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "base_perplexity" not in document and "ppl_change_vs_base" not in document


def test_train_refuses_sequences_longer_than_the_context(root, capsys):
    argv = train_args(root, "long-run", "--max-steps", "1")
    argv[argv.index("--max-length") + 1] = "300"
    assert main(argv) == 2
    assert "--max-length 300 is longer than the model's context (256 tokens" in capsys.readouterr().err
    assert not (root / "long-run").exists()


def test_info_of_an_exported_checkpoint_says_merged(root, capsys):
    assert main(["export", str(root / "adapter"), "--output", str(root / "merged")]) == 0
    capsys.readouterr()
    assert main(["info", str(root / "merged"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"].startswith("merged BEAM checkpoint")
    assert info["exported_from"] == str(root / "model")


@pytest.fixture(scope="module")
def interrupted(root):
    """A real Ctrl-C (KeyboardInterrupt in the main thread) once the run's first checkpoint exists."""
    argv = train_args(root, "interrupted", "--max-steps", "100000", "--save-every", "1", "--overwrite")
    output = root / "interrupted"

    finished = threading.Event()

    def press_ctrl_c():
        while not checkpoint_dirs(output):
            if finished.wait(0.05):
                return  # the run ended some other way; the test reports its exit code
        _thread.interrupt_main()

    # interrupt_main() does nothing while SIGINT is ignored, as it is in a job that a
    # non-interactive shell started in the background: give the test Python's own handler.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        finished.set()
        presser.join()
        signal.signal(signal.SIGINT, handler)
    return argv, output, code, err.getvalue()


def test_interrupted_train_says_how_to_resume(interrupted):
    argv, output, code, err = interrupted
    assert code == 130
    line = next(line for line in err.splitlines() if "interrupted" in line)
    assert "continue from step-" in line
    command = shlex.split(line.split(" with: ", 1)[1])
    assert command[0] == "beam-moe" and command[-1] == "--resume" and "--overwrite" not in command
    assert command[1:-1] == [a for a in argv if a != "--overwrite"]
    args = build_parser().parse_args(command[1:])
    assert check_output(config_from_args(args)) == output, "the hinted command is a valid --resume"


def test_a_training_checkpoint_evaluates(root, interrupted, capsys):
    checkpoint = checkpoint_dirs(interrupted[1])[-1]
    assert main(["info", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"].startswith("training checkpoint") and info["run"] == str(interrupted[1])
    argv = ["eval", str(checkpoint), "--ppl", str(root / "text.jsonl"), "--max-length", "128", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    document = json.loads(capsys.readouterr().out)
    assert document["checkpoint_of"] == str(interrupted[1])
    assert document["routing"] == {"method": "beam"}
    assert document["perplexity"]["scored_tokens"] == document["base_perplexity"]["scored_tokens"]

    # The unfinished run's folder itself points at its checkpoint.
    assert main(["eval", str(interrupted[1]), "--ppl", str(root / "text.jsonl")]) == 2
    assert f"evaluate its last checkpoint ({checkpoint})" in capsys.readouterr().err
