"""`accelerate launch` with 2 CPU processes (DDP over gloo) matches one process with the same global batch.

Tolerance: both runs see the same sequences in every step and normalise the loss by the global
batch's token count, so they differ only by floating-point summation order: losses within 1e-5,
the Avg-K and beta series exactly, the trained heads within 1e-5.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from beam_moe.cli import main
from helpers.training import model_dir, write_text_jsonl

ACCELERATE = Path(sys.executable).parent / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "split" not in m]


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="needs accelerate")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model_dir(tmp_path / "model")
    write_text_jsonl(tmp_path / "text.jsonl", n=100)

    def argv(output: str, batch_size: int) -> list[str]:
        return [
            "train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.jsonl"),
            "--output", str(tmp_path / output), "--target-avg-k", "2", "--max-steps", "6",
            "--batch-size", str(batch_size), "--max-length", "32", "--no-progress", "--no-tensorboard",
        ]  # fmt: skip

    assert main(argv("one", 4)) == 0
    launcher = str(ACCELERATE) if ACCELERATE.exists() else "accelerate"
    launch = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "beam_moe.cli",
    ]  # fmt: skip
    result = subprocess.run([*launch, *argv("two", 2)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert a["tokens"] == b["tokens"], "the same global batch"
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert a["avg_k"] == b["avg_k"] and abs(a["beta"] - b["beta"]) < 1e-9
    heads = [load_file(tmp_path / run / "beam_adapter.safetensors") for run in ("one", "two")]
    for name, value in heads[0].items():
        assert torch.allclose(value, heads[1][name], atol=1e-5), name
