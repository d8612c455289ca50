"""`vllm serve` with the plugin on 127.0.0.1: 16 concurrent OpenAI-API requests, each answered as if alone.

The server runs with tensor parallelism 2 (one core per rank), so the replicated mask heads are
exercised too: both ranks must count the same kept pairs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from beam_moe import beam_stats, from_pretrained
from serving_models import save_base, save_merged

REQUESTS = 16
MAX_TOKENS = 8
HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def one_core_per_rank(ranks: int = 2) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` ranks, from the cores this process may run on (a CI
    runner's may not include cores 0 and 1); with fewer cores than ranks, ranks share them."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return "|".join(str(cores[rank % len(cores)]) for rank in range(ranks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    merged = save_merged(save_base("qwen3_moe", root / "base"), root / "merged", trained=True)
    port, log = free_port(), root / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_SERVER_DEV_MODE": "1",  # exposes /collective_rpc, used to read the Avg-K counters
        "BEAM_MOE_LOG_INTERVAL": "1",
        "VLLM_CPU_OMP_THREADS_BIND": one_core_per_rank(),  # vLLM's "auto" wants a NUMA node per rank
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable, str(HERE / "vllm_serve.py"), "serve", str(merged),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "256", "--max-num-seqs", str(REQUESTS), "--seed", "0",
        "--worker-extension-cls", "beam_moe.serving.vllm.stats.BeamWorkerExtension",
        "--tensor-parallel-size", "2",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 400
        while True:
            assert process.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "vllm serve did not start: " + log.read_text()[-5000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        yield port, merged, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [
        torch.randint(5, 261, (int(n),), generator=generator).tolist() for n in torch.arange(REQUESTS) % 7 + 4
    ]


def complete(port: int, model: Path, prompt: list[int]) -> list[int]:
    body = {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    return post(port, "/v1/completions", {**body, "return_token_ids": True})["choices"][0]["token_ids"]


def served_stats(port: int) -> dict:
    ranks = post(port, "/collective_rpc", {"method": "beam_stats"})["results"]
    assert len(ranks) == 2 and ranks[0] == ranks[1], "tensor-parallel ranks make the same mask decisions"
    return ranks[0]


def test_concurrent_answers_equal_answers_alone(server):
    port, merged, log = server
    requests = prompts()
    post(port, "/collective_rpc", {"method": "beam_reset_stats"})
    with ThreadPoolExecutor(REQUESTS) as pool:
        together = list(pool.map(lambda p: complete(port, merged, p), requests))
    stats_together = served_stats(port)
    post(port, "/collective_rpc", {"method": "beam_reset_stats"})
    alone = [complete(port, merged, p) for p in requests]
    stats_alone = served_stats(port)

    assert all(len(answer) == MAX_TOKENS for answer in together)
    assert together == alone
    assert len({tuple(answer) for answer in alone}) > 1, "different prompts, different answers"

    model = from_pretrained(merged)
    with torch.no_grad(), beam_stats(model) as expected:
        for prompt, answer in zip(requests, alone, strict=True):
            model(torch.tensor([prompt + answer[:-1]]))
    for stats in (stats_together, stats_alone):
        assert (stats["tokens"], stats["kept_pairs"]) == (expected.tokens, expected.kept_pairs)
        assert stats["computed_rows"] == stats["kept_pairs"] < stats["routed_pairs"]
    assert "BEAM: Avg-K" in log.read_text(), "the periodic Avg-K log line"
