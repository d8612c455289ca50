"""The `beam-moe` command's CPU threads: a passive OpenMP wait policy set before torch loads, and
torch's thread count following the cores other processes leave free (beam_moe/threads.py)."""

import os
import subprocess
import sys
import time

import pytest
import torch

from beam_moe import threads
from beam_moe.cli import main

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


def test_importing_the_cli_leaves_torch_unloaded():
    """`beam-moe` can only set OpenMP's wait policy if torch is not yet loaded when it starts."""
    code = "import sys, beam_moe, beam_moe.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_command_sets_the_wait_policy_before_torch_loads(preset, expected):
    """What OMP_WAIT_POLICY says at the moment torch is first imported by the real command
    (an audit hook sees the import); a policy the user set is kept."""
    code = (
        "import os, sys\n"
        "seen = []\n"
        "def hook(event, args):\n"
        "    if event == 'import' and args[0] == 'torch' and not seen:\n"
        "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "sys.addaudithook(hook)\n"
        "from beam_moe.cli import main\n"
        "try:\n"
        "    main(['flops', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(seen[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == expected


def test_threads_for_leaves_the_busy_cores():
    assert threads.threads_for(2, 0.0) == 2
    assert threads.threads_for(2, 0.3) == 2
    assert threads.threads_for(2, 1.3) == 1
    assert threads.threads_for(2, 5.0) == 1, "always at least one thread"
    assert threads.threads_for(8, 2.6) == 5


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_governor_takes_one_thread_beside_busy_processes(capsys):
    """Two processes spinning on every core this test may use: the others are seen busy on more
    than one core and the governor drops to one thread (other load on the machine only adds). It
    says so only once a loop runs, so a command refused at its arguments prints one line."""
    cores = threads.usable_cores()
    spinners = [
        subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=3)]) for _ in range(max(2, cores))
    ]
    before = torch.get_num_threads()
    try:
        time.sleep(0.5)
        load = threads.CpuLoad()
        time.sleep(0.5)
        assert load.others_busy() > min(cores, 2) * 0.6
        governor = threads.ThreadGovernor(cores=cores, recheck_s=60.0)
        assert governor.threads == torch.get_num_threads() == 1
        assert capsys.readouterr().err == ""
        governor.tick()
        assert "other processes busy on" in capsys.readouterr().err
        governor.recheck_s = 0.0
        time.sleep(0.3)
        governor.tick()
        assert governor.threads == torch.get_num_threads() == 1
    finally:
        for spinner in spinners:
            spinner.kill()
        torch.set_num_threads(before)


def test_fixed_threads_hold_while_the_command_runs_and_are_restored(tmp_path, capsys):
    before = torch.get_num_threads()
    assert main(["flops", "--preset", "qwen3-30b-a3b", "--avg-k", "2", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    threads.govern(1)
    try:
        assert torch.get_num_threads() == 1
        threads.tick()  # a fixed count is not changed by the loops
        assert torch.get_num_threads() == 1
    finally:
        threads.release()
    assert torch.get_num_threads() == before
