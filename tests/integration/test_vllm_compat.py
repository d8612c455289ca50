"""The plugin's vLLM version gate and its named accesses to vLLM internals (no engine started)."""

import types
import warnings

import pytest
import torch

from beam_moe import BeamError
from beam_moe.errors import BeamWarning

pytest.importorskip("vllm")

import vllm

from beam_moe.serving import vllm as plugin
from beam_moe.serving.vllm import compat

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3", "0.32.1.dev4+g0123abc"])
def test_supported_versions_register_silently(version, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plugin.register()
    assert "BeamQwen3MoeForCausalLM" in vllm.ModelRegistry.get_supported_archs()


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "1.0.0", "dev"])
def test_an_unsupported_version_is_refused_with_the_supported_range(version, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.delenv(plugin.ALLOW_VERSION_ENV, raising=False)
    with pytest.raises(BeamError) as refused:
        plugin.register()
    message = str(refused.value)
    assert f"supports vLLM >=0.32,<0.33 (tested: 0.32.0), this is vLLM {version}" in message
    assert "BEAM_MOE_ALLOW_VLLM_VERSION=1" in message and "VLLM_PLUGINS" in message


def test_the_env_var_turns_the_refusal_into_a_warning(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.setenv(plugin.ALLOW_VERSION_ENV, "1")
    with pytest.warns(BeamWarning, match="this is vLLM 0.33.0; going on because BEAM_MOE_ALLOW_VLLM_VERSION"):
        plugin.register()
    assert "BeamQwen3MoeForCausalLM" in vllm.ModelRegistry.get_supported_archs()


def test_query_start_loc_is_found_in_any_layers_metadata():
    starts = torch.tensor([0, 3, 5])
    per_layer = [
        {"layers.0.attn": types.SimpleNamespace(other=1)},
        {"layers.1.attn": types.SimpleNamespace(query_start_loc=starts)},
    ]
    assert compat.query_start_loc(per_layer) is starts
    assert compat.query_start_loc(types.SimpleNamespace(query_start_loc=starts)) is starts
    assert compat.query_start_loc({"layers.0.attn": types.SimpleNamespace()}) is None


def test_attention_metadata_is_none_outside_a_forward_pass():
    assert compat.attention_metadata() is None


def test_reclass_only_into_a_subclass():
    class Base:
        pass

    class Derived(Base):
        pass

    obj = Base()
    compat.reclass(obj, Derived)
    assert type(obj) is Derived
    with pytest.raises(TypeError, match="is not a"):
        compat.reclass(object(), Derived)
