"""Every code block of README.md and docs/*.md runs, in document order, on tiny stand-ins.

Each document runs in a fresh folder that holds, under the paths the document names, a tiny
Qwen3-MoE (Top-4 of 8, byte tokenizer), small text and chat files, BEAM adapters trained here, and
`.venv` pointing at the environment running the tests. Blocks that depend on earlier ones (train,
then eval, then export, then load) run after them, as a reader would. Python blocks run in this
process, each in a fresh namespace. In bash blocks, every `beam-moe ...` command goes through the
CLI's entry point (`beam_moe.cli.main`, exit code checked) in this process: a new process per
command would spend seconds importing torch and transformers, twenty times over (the console
script itself runs in tests/integration/test_cli.py and the CLI tests). Anything else runs in bash.

Long runs are shortened by the reviewed SUBSTITUTIONS table below, never by editing the docs.
Blocks that cannot run here are listed in NOT_RUN with the reason and the test that covers them.
A code block that is in neither runs, so a new block that fails here must be fixed or listed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.training import model_dir, write_chat_jsonl, write_text_jsonl

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
CODE = {"python", "bash", "sh", "console", "shell"}
# Output, file layouts and config excerpts: shown, not run.
NOT_CODE = {"", "text", "json"}
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def __str__(self) -> str:
        return f"{self.document}:{self.line} ({self.first_line!r})"


def blocks(document: str) -> list[Block]:
    """The fenced blocks of `document`, in order."""
    found, lines, i = [], (ROOT / document).read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found.append(Block(document, i + 1, opening.group(1).lower(), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return found


# Blocks that are not run: (document, how the block's first line starts, why and what covers it).
NOT_RUN = [
    ("README.md", "bash scripts/setup.sh", "creates the environment these tests run in and downloads the "
     "corpus once (network)"),
    ("README.md", ".venv/bin/python -m pytest", "the test suite itself"),
    ("README.md", ".venv/bin/beam-moe quickstart", "9 minutes; tests/integration/test_quickstart.py runs the same "
     "command with tiny settings"),
    ("README.md", "python benchmarks/refmoe_sweep.py", "18 training runs and an hour of evaluation; the "
     "pieces it uses (Recipe, sweep, calibrate) are tested in tests/integration/test_quickstart.py and tests/test_eval_*.py"),
    ("docs/reference-moe.md", "bash scripts/setup.sh                      # prepares", "setup downloads the "
     "corpus; pretraining takes 96 minutes: tests/integration/test_refmoe_pretrain.py runs it for a few steps"),
    ("docs/reference-moe.md", "bash scripts/setup.sh          # once", "setup downloads the corpus; the "
     "quickstart takes 9 minutes: tests/integration/test_quickstart.py runs it with tiny settings"),
    ("docs/reference-moe.md", "python benchmarks/refmoe_sweep.py", "the same sweep as in README.md: hours"),
    ("docs/serving.md", "VLLM_CPU_KVCACHE_SPACE=4 beam-moe serve", "a server that runs until stopped, and "
     "a curl request to it: tests/integration/test_vllm_serve.py starts `beam-moe serve` and sends curl the same request"),
    ("docs/serving.md", "from openai import OpenAI", "needs the server above: tests/integration/test_vllm_serve.py streams "
     "with the openai client and checks the text against the greedy answer"),
    ("docs/reference-moe.md", "python benchmarks/refmoe_diagnosis.py", "several 7-minute training runs on "
     "the reference MoE; tests/integration/test_quickstart.py covers the recipe"),
    ("docs/serving.md", "python -m venv .venv", "creates a new environment from PyPI (network); the "
     "environment these tests run in was built this way"),
    ("docs/serving.md", "from vllm import LLM", "starts a vLLM engine (a minute or more): "
     "tests/integration/test_vllm_plugin.py runs engine_stats / reset_engine_stats on a real engine"),
    ("docs/serving.md", "# per-request budgets, offline", "starts a vLLM engine: "
     "tests/integration/test_vllm_budgets.py serves mixed per-request budgets on a real engine"),
    ("docs/serving.md", "# per-request budgets over HTTP", "needs a running server: "
     "tests/integration/test_vllm_serve.py sends per-request thresholds over HTTP"),
    ("docs/serving.md", "# per-request budgets with the openai client", "needs a running server: "
     "tests/integration/test_vllm_serve.py sends per-request thresholds over HTTP"),
    ("docs/serving.md", ".venv/bin/python benchmarks/serving_vllm.py", "a benchmark at real layer sizes "
     "(minutes); tests/integration/test_vllm_plugin.py covers the plugin it times"),
    ("docs/speed.md", "beam-moe bench layer", "one layer at Qwen3-30B-A3B's real sizes: minutes even with "
     "one round; tests/integration/test_bench.py runs the same benchmark on a tiny preset, and the command's input checks"),
    ("docs/speed.md", "beam-moe bench make-model", "writes a 5 GB model; tests/integration/test_bench.py builds the same "
     "kind of model on a tiny preset and runs `bench generate` on it"),
    ("docs/training.md", "accelerate launch", "8 processes; tests/integration/test_train_distributed.py runs "
     "`accelerate launch` with 2 CPU processes"),
]  # fmt: skip


def not_run(block: Block) -> list[str]:
    """Why `block` is not run (empty when it is)."""
    return [
        why
        for document, start, why in NOT_RUN
        if document == block.document and block.first_line.startswith(start)
    ]


# Commands skipped inside blocks that otherwise run: (its beginnings) -> why, and what covers it.
SKIPPED_COMMANDS = {
    (
        "vllm serve",
        "beam-moe serve",
    ): "starts a server that runs until stopped: tests/integration/test_vllm_serve.py "
    "starts it on an exported model and sends it curl and openai-client requests",
    ("beam-moe bench layer --preset qwen3-30b-a3b",): "minutes at real sizes: see docs/speed.md's block "
    "in NOT_RUN",
}

# (document, text in its blocks, replacement, why). Every entry must match.
SUBSTITUTIONS = [
    (
        "README.md",
        "--max-length 2048 --gradient-checkpointing",
        "--max-length 32 --gradient-checkpointing --max-steps 3 --batch-size 2 --calibration-tokens 256 --no-progress",
        "a 3-step run of short sequences",
    ),
    ("README.md", "--limit 200", "--limit 2", "two documents of the task"),
    (
        "README.md",
        "beam-moe sweep runs/beam --ppl",
        "beam-moe sweep runs/beam --points 2 --max-tokens 1024 --calibration-tokens 512 --ppl",
        "two points per continuous baseline on 1024 tokens",
    ),
    (
        "README.md",
        'output="runs/beam",\n                           target_avg_k=2.0, max_steps=500))',
        'output="runs/beam-python",\n                           target_avg_k=2.0, max_steps=2, max_length=32, '
        "calibration_tokens=256))",
        "a 2-step run; runs/beam holds the CLI run of the block above (a finished run is not overwritten)",
    ),
    (
        "docs/training.md",
        "--max-length 2048 --batch-size 4 --grad-accum 8 \\\n    --gradient-checkpointing --max-steps 2000",
        "--max-length 32 --batch-size 2 --grad-accum 2 \\\n    --gradient-checkpointing --max-steps 2 "
        "--calibration-tokens 256 --no-progress",
        "a 2-step run of short sequences",
    ),
    (
        "docs/training.md",
        'output="runs/beam",\n                           target_avg_k=2.0, max_steps=500, progress=False',
        'output="runs/beam-python",\n                           target_avg_k=2.0, max_steps=2, max_length=32, '
        "calibration_tokens=256, progress=False",
        "a 2-step run; runs/beam holds the CLI run of the block above",
    ),
    ("docs/evaluation.md", "--limit 100", "--limit 2", "two documents per task"),
    (
        "docs/evaluation.md",
        "adapters/beta_0.2 --ppl",
        "adapters/beta_0.2 --points 2 --max-tokens 1024 --calibration-tokens 512 --ppl",
        "two points per continuous baseline on 1024 tokens",
    ),
    (
        "docs/evaluation.md",
        " [--baseline top_p --param 0.6]",
        "",
        "optional arguments shown in brackets; `--baseline top_p --param 0.6` runs in the eval block above",
    ),
    (
        "docs/evaluation.md",
        "perplexity(model, tokenizer, DEFAULT_PPL_FILE)",
        "perplexity(model, tokenizer, DEFAULT_PPL_FILE, max_tokens=2048)",
        "the first 2048 tokens of the shipped text",
    ),
    (
        "docs/evaluation.md",
        "data=DEFAULT_PPL_FILE)",
        "data=DEFAULT_PPL_FILE, max_tokens=1024)",
        "calibrates on the first 1024 tokens",
    ),
    (
        "docs/evaluation.md",
        'adapters=["a1/", "a2/"])',
        'adapters=["a1/", "a2/"], points=2, max_tokens=2048, calibration_tokens=1024)',
        "two points per baseline on the first 2048 tokens",
    ),
]

# Adapters trained here, placed where a document's blocks expect one (the doc's own runs write the rest).
ADAPTERS = {
    "docs/evaluation.md": [
        "adapter", "a1", "a2", "adapters/beta_0.01", "adapters/beta_0.05", "adapters/beta_0.2",
    ],
    "docs/serving.md": ["ADAPTER"],
}  # fmt: skip
# Model and data paths the documents use -> what stands in for them.
MODELS = ["path/to/Qwen3-30B-A3B", "path/to/model"]
CHAT = ["chat.jsonl", "tulu.jsonl"]
TEXT = ["held_out.jsonl"]
# Set up by code the document leaves to the reader ("in your own training loop").
PRELUDES = {
    (
        "docs/training.md",
        "from beam_moe.train import BudgetController, calibrate_router_heads, calibrate_threshold",
    ): """
from beam_moe import attach
from beam_moe.base_models import load_base_model, load_tokenizer
model = attach(load_base_model("path/to/model"))
ids = load_tokenizer("path/to/model")(open("held_out.jsonl").read())["input_ids"][:256]
batches = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}]
""",
}


def code_blocks(document: str) -> list[Block]:
    found = []
    for block in blocks(document):
        if block.lang not in CODE | NOT_CODE:
            raise AssertionError(f"{block}: unknown language {block.lang!r}; add it to CODE or NOT_CODE")
        if block.lang in CODE:
            found.append(block)
    return found


def substituted(block: Block) -> str:
    text = block.text
    for document, old, new, _ in SUBSTITUTIONS:
        if document == block.document:
            text = text.replace(old, new)
    return text


def test_every_code_block_is_run_or_listed_and_every_entry_is_used():
    every = [b for d in DOCUMENTS for b in code_blocks(d)]
    assert every, "no code blocks found"
    keys = {(b.document, b.first_line) for b in every}
    for document, start, _ in NOT_RUN:
        matches = [b for b in every if b.document == document and b.first_line.startswith(start)]
        assert len(matches) == 1, f"NOT_RUN's {document}: {start!r} names {len(matches)} blocks, not one"
    assert not PRELUDES.keys() - keys, f"PRELUDES names blocks that are gone: {PRELUDES.keys() - keys}"
    for document, old, _, why in SUBSTITUTIONS:
        assert any(old in b.text for b in every if b.document == document), (
            f"substitution for {document} ({why}) matches no block: {old!r}"
        )
    run = [b for b in every if not not_run(b) and b.lang != "python"]
    for starts in SKIPPED_COMMANDS:
        lines = [shlex.join(words) for b in run for words in commands(b.text)]
        assert any(line.startswith(start) for line in lines for start in starts), (
            f"SKIPPED_COMMANDS names commands that no block runs: {starts}"
        )
    # A command in an unmarked block would escape this test: mark it ```bash (or ```text: a synopsis).
    command = re.compile(r"^(\S+=\S+ )*(\.venv/bin/)?(beam-moe|python|vllm|curl) ")
    for document in DOCUMENTS:
        for block in blocks(document):
            assert not (block.lang == "" and command.match(block.first_line)), f"{block}: mark it ```bash"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """The tiny model, text and chat files, and one trained adapter that every document shares."""
    from beam_moe.train import TrainConfig, train

    root = tmp_path_factory.mktemp("docs")
    model_dir(root / "model")
    write_chat_jsonl(root / "chat.jsonl", n=60)
    write_text_jsonl(root / "text.jsonl", n=80)
    train(
        TrainConfig(
            model=str(root / "model"), data=[str(root / "text.jsonl")], output=str(root / "adapter"),
            target_avg_k=2.0, max_steps=2, batch_size=2, max_length=32, calibration_tokens=256,
            progress=False, tensorboard=False,
        )
    )  # fmt: skip
    return root


def workspace(stand_ins: Path, where: Path, document: str) -> None:
    """`where` holds what `document` names: models, data, adapters, and `.venv`."""
    for name in MODELS:
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).symlink_to(stand_ins / "model", target_is_directory=True)
    for names, source in ((CHAT, "chat.jsonl"), (TEXT, "text.jsonl")):
        for name in names:
            (where / name).symlink_to(stand_ins / source)
    for name in ADAPTERS.get(document, []):
        shutil.copytree(stand_ins / "adapter", where / name)
    (where / ".venv").symlink_to(sys.prefix, target_is_directory=True)


SHELL_SYNTAX = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}


def commands(text: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def skipped(words: list[str]) -> bool:
    line = shlex.join(words)
    return any(line.startswith(start) for starts in SKIPPED_COMMANDS for start in starts)


def run_beam_moe(block: Block, words: list[str], monkeypatch) -> None:
    """`[VAR=value ...] [.venv/bin/]beam-moe ARGS` through the CLI's entry point, in this process."""
    from beam_moe.cli import main

    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    try:
        code = main(words[1:])
    except SystemExit as e:  # argparse refused the arguments
        code = e.code
    assert code == 0, f"{block}: `{shlex.join(words)}` exited {code}"


def run_shell(block: Block, text: str, where: Path, monkeypatch) -> None:
    """Each `beam-moe` command runs in this process (a new one costs seconds of imports per
    command); any other command, or shell syntax, runs in `bash -eu` with this environment's
    commands first on PATH."""
    for words in commands(text):
        if skipped(words):
            continue
        program = next(w for w in words if "=" not in w)
        if program in ("beam-moe", ".venv/bin/beam-moe") and not SHELL_SYNTAX & set(words):
            run_beam_moe(block, words, monkeypatch)
            continue
        env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models gain nothing from a second thread
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        result = subprocess.run(
            ["bash", "-eu", "-o", "pipefail", "-c", shlex.join(words)], cwd=where, env=env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, (
            f"{block}: `{shlex.join(words)}` exited {result.returncode}\n--- stdout:\n{result.stdout[-3000:]}"
            f"\n--- stderr:\n{result.stderr[-3000:]}"
        )


def run_python(block: Block, text: str) -> None:
    prelude = PRELUDES.get((block.document, block.first_line), "")
    namespace = {"__name__": "__main__"}
    if prelude:
        exec(compile("import torch\n" + prelude, f"<prelude of {block}>", "exec"), namespace)
    # Padded so that a traceback names the document's own line.
    exec(compile("\n" * block.line + text, block.document, "exec"), namespace)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_block_runs(document, stand_ins, tmp_path, monkeypatch, one_thread):
    workspace(stand_ins, tmp_path, document)
    monkeypatch.chdir(tmp_path)
    for block in code_blocks(document):
        if not_run(block):
            continue
        text = substituted(block)
        if block.lang == "python":
            run_python(block, text)
        else:
            run_shell(block, text, tmp_path, monkeypatch)
