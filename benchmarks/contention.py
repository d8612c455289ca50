"""The `beam-moe` command beside another busy torch process: is it still usable?

Machines are shared. A 2-thread torch job whose OpenMP threads spin (the default wait policy) beside
another busy process ran 10x slower; `beam-moe` now sets OMP_WAIT_POLICY=PASSIVE before torch
loads and uses the cores the others leave free (beam_moe/threads.py). This measures

- `steps`: a short `beam-moe train` on the reference MoE (4 steps of 4 x 256 tokens), training
  tokens/s, idle and beside the competitor, for the old behaviour (torch loaded before the command
  could set anything, 2 fixed threads) and the new defaults;
- `quickstart`: `beam-moe quickstart` with its defaults, wall time idle and beside the competitor
  (the goal: at most 1.5x the idle time);
- `quickstart-beside-beam-moe`: the same beside another `beam-moe train` on the reference MoE
  (a colleague's run on the same machine), which follows the free cores too.

The competitor is one plain torch process with torch's defaults (a thread per core, default wait
policy) multiplying matrices in a loop. Nothing else should run on the machine meanwhile. Kinds
given to `--what` that the output file already holds are kept, so a kind can be added later.

    python benchmarks/contention.py --what steps quickstart --output benchmarks/results/contention/contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPETITOR = """
import torch
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a.T / 30)
"""

# Torch is imported before the command starts, so the command cannot set the wait policy: the old behaviour.
OLD_BEHAVIOUR = "import sys, torch; from beam_moe.cli import main; sys.exit(main(sys.argv[1:]))"


def command_line(old: bool) -> list[str]:
    if old:
        return [sys.executable, "-c", OLD_BEHAVIOUR]
    return [sys.executable, "-m", "beam_moe.cli"]


def clean_env() -> dict[str, str]:
    """The environment a user has: no wait policy or thread count set."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}


class Competitor:
    """Nothing, a plain torch process (`True`), or a `beam-moe train` run (`"beam-moe"`)."""

    def __init__(self, kind: bool | str, scratch: Path | None = None) -> None:
        self.kind, self.scratch, self.process = kind, scratch, None

    def __enter__(self) -> Competitor:
        if self.kind == "beam-moe":
            from beam_moe.refmoe import reference_model_path

            assert self.scratch is not None
            data = self.scratch / "competitor.jsonl"
            training_text(data, 200 * 4 * 256)
            args = [
                "train", "--model", str(reference_model_path()), "--data", str(data),
                "--output", str(self.scratch / "competitor"), "--epochs", "1000", "--batch-size", "4",
                "--max-length", "256", "--target-avg-k", "2", "--val-fraction", "0", "--save-every", "0",
                "--no-progress", "--no-calibrate",
            ]  # fmt: skip
            self.process = subprocess.Popen([*command_line(False), *args], env=clean_env())
            time.sleep(60)  # loaded and training
        elif self.kind:
            self.process = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=clean_env())
            time.sleep(5)  # torch imported and multiplying
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            time.sleep(3)


def training_text(path: Path, characters: int) -> Path:
    from beam_moe.experiments.refmoe.experiment import write_training_text

    write_training_text(path, characters, None, 0, "heldout")
    return path


def run_steps(scratch: Path, old: bool, competing: bool) -> dict:
    from beam_moe.refmoe import reference_model_path

    data = scratch / "train.jsonl"
    if not data.exists():
        training_text(data, 4 * 4 * 256 * 2)
    output = scratch / f"steps-{int(old)}-{int(competing)}"
    args = [
        "train", "--model", str(reference_model_path()), "--data", str(data), "--output", str(output),
        "--max-steps", "4", "--batch-size", "4", "--max-length", "256", "--target-avg-k", "1.5",
        "--no-calibrate", "--val-fraction", "0", "--no-progress", "--json", "--save-every", "0",
    ]  # fmt: skip
    if old:
        args += ["--threads", "2"]
    with Competitor(competing):
        started = time.perf_counter()
        done = subprocess.run(command_line(old) + args, capture_output=True, text=True, env=clean_env())
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"train failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    return {
        "behaviour": "old: torch loaded first, 2 threads" if old else "new: defaults",
        "competitor": competing,
        "tokens_per_s": round(summary["tokens"] / summary["elapsed_s"], 1),
        "train_loop_s": summary["elapsed_s"],
        "wall_s": round(wall, 1),
        "thread_messages": [line for line in done.stderr.splitlines() if "torch thread" in line],
    }


def run_quickstart(scratch: Path, competing: bool | str) -> dict:
    output = scratch / f"quickstart-{competing}"
    with Competitor(competing, scratch):
        started = time.perf_counter()
        done = subprocess.run(
            [*command_line(False), "quickstart", "--output", str(output), "--no-progress"],
            capture_output=True,
            text=True,
            env=clean_env(),
        )
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{done.stderr[-3000:]}")
    results = json.loads((output / "results.json").read_text())
    return {
        "competitor": competing,
        "wall_s": round(wall, 1),
        "stage_seconds": results["stage_seconds"],
        "stage_lines": [line for line in done.stderr.splitlines() if line.startswith("quickstart [")],
        "thread_messages": [line for line in done.stderr.splitlines() if "torch thread" in line],
        "beam_ppl": results["comparison"]["beam_ppl"],
        "avg_k": results["comparison"]["avg_k"],
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from beam_moe.bench.machine import describe_machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--what",
        nargs="+",
        choices=("steps", "quickstart", "quickstart-beside-beam-moe"),
        default=["steps", "quickstart", "quickstart-beside-beam-moe"],
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    command = "python benchmarks/contention.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    document: dict = json.loads(args.output.read_text()) if args.output.exists() else {}
    document.setdefault("runs", []).append({"command": command, "what": args.what})
    document["machine"] = describe_machine(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        if "steps" in args.what:
            rows = [
                run_steps(Path(scratch), old, competing)
                for old in (False, True)
                for competing in (False, True)
            ]
            for row in rows:
                print(json.dumps(row), flush=True)
            document["steps"] = rows
            speed = {(r["behaviour"][:3], r["competitor"]): r["tokens_per_s"] for r in rows}
            document["steps_slowdown_with_competitor"] = {
                "new": round(speed[("new", False)] / speed[("new", True)], 2),
                "old": round(speed[("old", False)] / speed[("old", True)], 2),
            }
        if "quickstart" in args.what:
            idle, competing = (run_quickstart(Path(scratch), c) for c in (False, True))
            print(json.dumps(idle), json.dumps(competing), sep="\n", flush=True)
            document["quickstart"] = {
                "idle": idle,
                "competing": competing,
                "ratio": round(competing["wall_s"] / idle["wall_s"], 2),
                "goal": "at most 1.5x the idle time",
            }
        if "quickstart-beside-beam-moe" in args.what:
            idle = document.get("quickstart", {}).get("idle") or run_quickstart(Path(scratch), False)
            beside = run_quickstart(Path(scratch), "beam-moe")
            print(json.dumps(beside), flush=True)
            document["quickstart_beside_beam_moe"] = {
                "idle": idle,
                "competing": beside,
                "ratio": round(beside["wall_s"] / idle["wall_s"], 2),
                "goal": "at most 1.5x the idle time",
            }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps({k: v for k, v in document.items() if k not in ("machine", "steps", "runs")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
