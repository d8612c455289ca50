"""`beam-moe serve` (vLLM's OpenAI server with the plugin) on 127.0.0.1: the command `beam-moe export`
prints starts it; 16 concurrent requests are each answered as if alone; curl and the `openai`
client (streaming) get the greedy answer; Ctrl-C stops it without leaking shared memory.

The server runs with tensor parallelism 2 (one core per rank), so the replicated mask heads are
exercised too: both ranks must count the same kept pairs. It starts once per module (a minute or
more on 2 cores); the argument checks run without it and without starting vLLM.
"""

import contextlib
import importlib.metadata
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from beam_moe import beam_stats, from_pretrained
from beam_moe.cli import main
from beam_moe.serving.vllm.server import VllmCpuAlias, install_vllm_cpu_alias
from helpers.serving_models import save_base, save_merged

REQUESTS = 16
MAX_TOKENS = 8
BEAM_MOE = str(Path(sys.executable).with_name("beam-moe"))


pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_thread")]


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


def export_and_hint(adapter: Path, merged: Path) -> list[str]:
    """`beam-moe export ADAPTER --output MERGED`, and the serve command its output tells the user to run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", str(adapter), "--output", str(merged)]) == 0
    hints = [line.split("serve:", 1)[1] for line in out.getvalue().splitlines() if "serve:" in line]
    assert len(hints) == 1, out.getvalue()
    return shlex.split(hints[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_merged(save_base("qwen3_moe", root / "base"), root / "first", trained=True)
    merged = root / "merged"
    hint = export_and_hint(root / "first-adapter", merged)
    assert hint == ["beam-moe", "serve", str(merged)], "the hint is the command below"
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
        BEAM_MOE, *hint[1:],
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
            assert time.monotonic() < deadline, "beam-moe serve did not start: " + log.read_text()[-5000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        yield port, merged, log, process
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
    port, merged, log, _ = server
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


def greedy_at(merged: Path, threshold: float, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy answer at `threshold` and the log-probability of each chosen token."""
    model = from_pretrained(merged, threshold=threshold)
    ids, chosen = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logp = model(ids).logits[0, -1].log_softmax(-1)
            chosen.append(float(logp.max()))
            ids = torch.cat([ids, logp.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist(), chosen


def complete_raw(port: int, body: dict) -> tuple[int, dict]:
    """POST /v1/completions; (HTTP status, JSON body) for errors too."""
    try:
        return 200, post(port, "/v1/completions", body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_per_request_thresholds_over_http(server):
    """Requests at three thresholds (vllm_xargs) and bad ones, concurrently: each good request gets
    transformers' greedy answer at its own threshold, each bad one a 400 naming the field."""
    port, merged, _, _ = server
    requests = prompts()[:9]
    thresholds = [0.3, None, 0.7] * 3
    bad = [{"beam_threshold": 1.5}, {"beam_threshold": "high"}, {"beam_avg_k": 1.0}]

    def body(prompt, xargs):
        extra = {"vllm_xargs": xargs} if xargs else {}
        return {
            "model": str(merged), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "logprobs": 1, **extra,
        }  # fmt: skip

    bodies = [
        body(p, {"beam_threshold": t} if t else None) for p, t in zip(requests, thresholds, strict=True)
    ]
    bodies += [body(requests[0], xargs) for xargs in bad]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: complete_raw(port, b), bodies))
    for (status, answer), prompt, threshold in zip(answers, requests, thresholds, strict=False):
        assert status == 200, answer
        tokens, logprobs = greedy_at(merged, 0.5 if threshold is None else threshold, prompt)
        choice = answer["choices"][0]
        assert choice["token_ids"] == tokens
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-3)
    low, high = greedy_at(merged, 0.3, requests[0])[1], greedy_at(merged, 0.7, requests[0])[1]
    assert low != pytest.approx(high, abs=1e-2), "the thresholds change the answer, so the check can fail"
    for (status, answer), xargs in zip(answers[len(requests) :], bad, strict=True):
        field = next(iter(xargs))
        assert status == 400, answer
        assert field in answer["error"]["message"], answer
    assert "calibrated" in answers[-1][1]["error"]["message"], "a budget in experts needs a curve"


def test_curl_completion(server):
    port, merged, _, _ = server
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = {"model": str(merged), "prompt": "Hello", "max_tokens": MAX_TOKENS, "temperature": 0}
    result = subprocess.run(
        ["curl", "-sS", "--fail", f"http://127.0.0.1:{port}/v1/completions",
         "-H", "Content-Type: application/json", "-d", json.dumps({**body, "ignore_eos": True})],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["model"] == str(merged)
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS
    assert (
        answer["choices"][0]["text"]
        == post(port, "/v1/completions", {**body, "ignore_eos": True})["choices"][0]["text"]
    ), "curl gets the greedy answer"


def test_openai_client_streams_the_greedy_answer(server):
    openai = pytest.importorskip("openai")
    port, merged, _, _ = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
    request = dict(model=str(merged), prompt="The quick brown fox", max_tokens=MAX_TOKENS, temperature=0)
    extra = {"ignore_eos": True, "return_token_ids": True}
    whole = client.completions.create(**request, extra_body=extra).choices[0]
    text, tokens, chunks = "", [], 0
    for chunk in client.completions.create(**request, stream=True, extra_body=extra):
        for choice in chunk.choices:
            chunks += 1
            text += choice.text
            tokens += getattr(choice, "token_ids", None) or []
    assert chunks > 1, "streamed in pieces"
    assert (text, tokens) == (whole.text, whole.token_ids)
    assert len(whole.token_ids) == MAX_TOKENS


def group_processes(group: int) -> list[Path]:
    """/proc entries of the live (not zombie) processes in process group `group`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == group:
                found.append(stat.parent)
    return found


def test_ctrl_c_stops_every_process_and_leaves_no_shared_memory(server):
    """Runs last. Ctrl-C (SIGINT to the terminal's process group): the command exits, every vLLM process
    ends, and the shared-memory segments the processes mapped are gone (see docs/serving.md)."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc to find the server's processes and shared memory")
    _, _, log, process = server
    segments = set()
    for entry in group_processes(process.pid):
        with contextlib.suppress(OSError):
            segments |= {
                line[line.index("/dev/shm/") :].split()[0]
                for line in (entry / "maps").read_text().splitlines()
                if "/dev/shm/" in line
            }
    assert segments, "tensor-parallel workers talk through shared memory"
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) in (0, 130), log.read_text()[-5000:]
    deadline = time.monotonic() + 60
    while group_processes(process.pid):
        assert time.monotonic() < deadline, "vLLM processes outlived the command: " + log.read_text()[-3000:]
        time.sleep(0.5)
    assert not [path for path in segments if Path(path).exists()], log.read_text()[-3000:]


def test_the_cpu_wheel_answers_to_its_own_name_once():
    """`vllm serve` looks up the distribution "vllm"; vllm-cpu's answer must select the CPU platform, as
    vLLM's own fallback does, without listing the wheel's entry points twice."""
    try:
        importlib.metadata.distribution("vllm")
        pytest.skip("a `vllm` distribution is installed (the GPU build): nothing to alias")
    except importlib.metadata.PackageNotFoundError:
        pass
    from vllm.platforms import vllm_version_matches_substr

    plugins = sorted(ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins"))
    install_vllm_cpu_alias()
    try:
        assert importlib.metadata.version("vllm") == importlib.metadata.version("vllm-cpu") + "+cpu"
        assert importlib.metadata.metadata("vllm")["Name"] == "vllm"
        assert vllm_version_matches_substr("cpu")
        assert (
            sorted(ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")) == plugins
        )
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, VllmCpuAlias)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-args")
    save_merged(save_base("qwen3_moe", root / "base"), root / "merged", trained=True)
    return root / "merged-adapter"


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BEAM_MOE, "serve", *args], capture_output=True, text=True, timeout=120)


def test_serve_refuses_an_adapter_and_a_missing_folder_before_starting_vllm(adapter, tmp_path):
    result = run_serve(str(adapter), "--port", "1")
    assert result.returncode == 2, result.stderr
    assert "is a BEAM adapter, not a merged checkpoint" in result.stderr
    assert f"beam-moe export {adapter} --output MERGED" in result.stderr
    result = run_serve(str(tmp_path / "missing"))
    assert (result.returncode, result.stdout) == (2, "")
    assert f"no such folder: {tmp_path / 'missing'}" in result.stderr
    result = run_serve(str(tmp_path))
    assert result.returncode == 2
    assert "not a model folder (no config.json)" in result.stderr
    assert len(result.stderr.splitlines()) == 1, "one line, and vLLM (which logs as it loads) never started"


def test_serve_help_says_where_the_arguments_go():
    result = run_serve("--help")
    assert result.returncode == 0
    assert "Every argument after MERGED goes to vLLM unchanged" in " ".join(result.stdout.split())
    assert "beam-moe serve runs/merged --port 8000 --enforce-eager" in result.stdout


def test_only_the_segments_left_by_dead_processes_are_removed(tmp_path):
    """After the server stops: a vLLM segment that appeared meanwhile and that no live process maps
    is removed; one that existed before, one a live process still maps, and other files stay."""
    import mmap

    from beam_moe.serving.vllm.server import remove_orphaned_segments, vllm_segments

    for name in ("vllm_dist_old", "vllm_dist_dead-cpushm_0", "vllm_dist_live-cpushm_0", "other"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    before = {"vllm_dist_old"}
    with open(tmp_path / "vllm_dist_live-cpushm_0", "r+b") as f, mmap.mmap(f.fileno(), 4096):
        removed = remove_orphaned_segments(before, root=tmp_path, wait_s=0.2)
    assert removed == ["vllm_dist_dead-cpushm_0"]
    assert vllm_segments(tmp_path) == {"vllm_dist_old", "vllm_dist_live-cpushm_0"}
    assert (tmp_path / "other").exists()
