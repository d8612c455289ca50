"""The benchmarks run end to end on tiny shapes and report what the issue asks for; bad input is refused."""

import json
import shlex

import pytest
import torch

from beam_moe.bench import machine
from beam_moe.bench.layer import bench_layer, exact_keep, fit_head
from beam_moe.bench.machine import measure_limits
from beam_moe.bench.synthetic import build_test_model, preset_config
from beam_moe.cli import main
from beam_moe.errors import BeamError
from beam_moe.mask import MaskHead
from beam_moe.presets import MoEPreset

TINY = MoEPreset("tiny-qwen3", 64, 32, 8, 2, 0, 1, "qwen3_moe")
TINY_SHARED = MoEPreset("tiny-qwen2", 64, 32, 8, 2, 48, 1, "qwen2_moe")
RESULT_FIELDS = {
    "tokens",
    "kept_pairs",
    "hf_topk_ms",
    "hf_impl",
    "beam_keepall_ms",
    "beam_ms",
    "floor_ms",
    "speedup_vs_hf",
    "ideal_speedup",
    "fraction_of_floor",
}


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL_PROBES = (16 << 20, 256)


def test_machine_limits_are_measured():
    limits = measure_limits(torch.device("cpu"), torch.bfloat16, 2, *SMALL_PROBES)
    assert limits.copy_gbs > 0.1 and limits.read_gbs > 0.1 and limits.gemm_tflops > 1e-4
    n = limits.gemm_shape[0]
    assert limits.gemm_shape == [n, n, n] and 128 <= n <= 256 and n % 128 == 0
    assert limits.fp32_gemm_shape is not None, "bf16 is also measured against float32's GEMM"
    assert limits.gemm_tflops >= limits.dtype_gemm_tflops > 0


def test_gemm_probe_shrinks_for_a_slow_dtype(monkeypatch):
    """A dtype the CPU has no arithmetic for (bf16 on AVX2 runs ~1 GFLOP/s) must not be probed at
    2048^3, a call of 15 s: the probe sizes itself to about GEMM_PROBE_SECONDS."""
    monkeypatch.setattr(machine, "GEMM_PROBE_SECONDS", 1e-6)
    probes = machine.LimitProbes(torch.device("cpu"), torch.bfloat16, 1 << 20, 2048)
    assert {a.shape[0] for a, _ in probes.gemms.values()} == {128}
    monkeypatch.setattr(machine, "GEMM_PROBE_SECONDS", 1e3)
    probes = machine.LimitProbes(torch.device("cpu"), torch.float32, 1 << 20, 384)
    assert [a.shape[0] for a, _ in probes.gemms.values()] == [384], "float32 alone, at the largest size"


@pytest.mark.parametrize("preset", [TINY, TINY_SHARED], ids=lambda p: p.model_type)
def test_layer_bench_reports_the_issue_fields(preset):
    document = bench_layer(
        preset, [2, 5], 1.5, draws=2, rounds=2, budget_s=1, probe_sizes=SMALL_PROBES, log=lambda _: None
    )
    assert {"preset", "avg_k", "device", "results"} <= set(document)
    assert document["preset"] == preset.name and document["avg_k"] == 1.5
    assert [r["tokens"] for r in document["results"]] == [2, 5]
    for row in document["results"]:
        assert set(row) >= RESULT_FIELDS
        assert row["kept_pairs"] == round(1.5 * row["tokens"])
        assert row["rows_computed"] == row["kept_pairs"], "masked pairs must not be computed"
        assert row["hf_impl"] in row["hf_ms"] and row["hf_topk_ms"] == min(row["hf_ms"].values())
        assert row["floor_ms"] > 0 and row["ideal_speedup"] >= 1
        assert row["speedup_vs_hf"] == pytest.approx(row["hf_topk_ms"] / row["beam_ms"], rel=1e-2)
        assert row["fraction_of_floor"] == pytest.approx(row["beam_ms"] / row["floor_ms"], rel=1e-2)
        assert row["keepall_rel_err_vs_hf"] < 2e-2, "BEAM keep-all computes what transformers computes"
        assert row["limits"]["copy_gbs"] > 0 and row["limits"]["gemm_tflops"] > 0
    json.dumps(document)


def test_masks_keep_exactly_the_asked_number_of_pairs():
    generator = torch.Generator().manual_seed(0)
    for tokens, kept in [(1, 1), (8, 10), (512, 630), (3, 0)]:
        keep = exact_keep(tokens, 8, kept, generator)
        assert keep.shape == (tokens, 8) and int(keep.sum()) == kept


@pytest.mark.parametrize("tokens", [1, 8, 40])
def test_a_fitted_head_decides_the_draws_mask(tokens):
    """The layer bench runs BEAM under a head fitted to each draw's random mask, so the head's own
    decision (what serving runs) must be exactly that mask."""
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 64, generator=generator).to(torch.bfloat16)
    ids = torch.rand(tokens, 16, generator=generator).topk(4, dim=1).indices
    keep = exact_keep(tokens, 4, max(1, tokens), generator)
    head = MaskHead(64, 16)
    fit_head(head, hidden, ids, keep)
    decided = torch.sigmoid(head.slot_logits(hidden, ids)) >= 0.5
    assert torch.equal(decided, keep)


def test_fitting_a_head_to_more_tokens_than_its_width_is_refused():
    ids = torch.zeros(70, 1, dtype=torch.long)
    with pytest.raises(BeamError, match="70 tokens route to expert 0"):
        fit_head(MaskHead(64, 4), torch.randn(70, 64), ids, torch.ones(70, 1, dtype=torch.bool))


def test_preset_configs_have_the_real_layer_sizes():
    from transformers import AutoModelForCausalLM

    from beam_moe.families import family_for
    from beam_moe.presets import PRESETS

    for preset in PRESETS.values():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(preset_config(preset, num_layers=2))
        family = family_for(model)
        blocks = family.find_blocks(model)
        assert len(blocks) == 2, "every layer is an MoE layer"
        block = blocks[0][1]
        experts = block.experts
        assert experts.gate_up_proj.shape == (
            preset.num_experts,
            2 * preset.expert_intermediate,
            preset.hidden_size,
        )
        assert experts.down_proj.shape == (preset.num_experts, preset.hidden_size, preset.expert_intermediate)
        assert int(family.router(block).top_k) == preset.top_k
        assert bool(family.shared_experts(block)) == bool(preset.shared_intermediate)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope", "--avg-k", "1"], "unknown preset 'nope'"),
        (["--preset", "qwen3-30b-a3b", "--avg-k", "9"], "--avg-k must lie in"),
        (["--preset", "qwen3-30b-a3b", "--avg-k", "1", "--tokens", "1,x"], "--tokens must be"),
        (["--preset", "qwen3-30b-a3b", "--avg-k", "1", "--backend", "fast"], "unknown expert backend"),
    ],
)
def test_layer_cli_refuses_bad_input(argv, message, capsys):
    assert main(["bench", "layer", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def test_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "model"
    summary = build_test_model(
        out, TINY, num_layers=2, avg_k=1.2, dtype=torch.float32, calibration_tokens=256
    )
    return out, summary


def test_test_model_is_calibrated_to_the_target(test_model):
    out, summary = test_model
    assert (out / "base" / "config.json").is_file()
    assert (out / "adapter" / "beam_config.json").is_file()
    assert all(abs(k - 1.2) < 0.05 for k in summary["calibrated_avg_k"])


def test_generate_bench_end_to_end(test_model, capsys, tmp_path):
    out, _ = test_model
    argv = ["bench", "generate", str(out / "adapter"), "--input-len", "16", "--output-len", "4"]
    argv += ["--batch-sizes", "1,2", "--repeats", "1", "--dtype", "float32", "--threads", "1", "--json"]
    assert main([*argv, "--output", str(tmp_path / "generate.json")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == json.loads((tmp_path / "generate.json").read_text())
    assert document["command"] == shlex.join(["beam-moe", *argv, "--output", str(tmp_path / "generate.json")])
    assert (document["input_len"], document["output_len"], document["moe_layers"]) == (16, 4, 2)
    for row, batch in zip(document["results"], [1, 2], strict=True):
        assert row["batch_size"] == batch
        assert set(row["models"]) == {"beam", "base_eager", "base_grouped_mm"}
        for timing in row["models"].values():
            assert timing["ttft_ms"] > 0 and timing["tpot_ms"] > 0 and timing["throughput_tok_s"] > 0
        assert 0.6 < row["beam_avg_k"] < 1.8, "fresh prompts keep about the calibrated Avg-K"
        assert row["base"] in ("base_eager", "base_grouped_mm")


def test_generate_refuses_a_missing_adapter(tmp_path, capsys):
    assert main(["bench", "generate", str(tmp_path / "nothing")]) == 2
    assert "error" in capsys.readouterr().err


def test_make_model_cli_refuses_an_impossible_avg_k(tmp_path, capsys):
    assert main(["bench", "make-model", "--output", str(tmp_path / "m"), "--avg-k", "9"]) == 2
    assert "--avg-k must lie in (0, 8]" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_machine_block_records_the_cpu_features_that_set_the_gemm_floor():
    """The flags come from /proc/cpuinfo (read here independently) and torch's own probes agree."""
    import platform
    from pathlib import Path

    from beam_moe.bench.machine import GEMM_FLAGS, describe_machine

    info = describe_machine(torch.device("cpu"))
    assert {"cpu_flags", "torch_cpu"} <= set(info)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    listed = [
        line.split(":", 1)[1].split() for line in lines if line.split(":")[0].strip() in ("flags", "Features")
    ]
    names = GEMM_FLAGS.get(platform.machine())
    if not listed or names is None:
        assert info["cpu_flags"] is None
    else:
        assert info["cpu_flags"] == {name: name in listed[0] for name in names}
    torch_cpu = info["torch_cpu"]
    assert torch_cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert torch_cpu["amx_tile"] == torch.cpu._is_amx_tile_supported()
    assert torch_cpu["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    if info["cpu_flags"] is not None and platform.machine() == "x86_64":
        # torch also needs the OS to enable a feature, so it may see less than the CPU lists, never more
        assert not torch_cpu["amx_tile"] or info["cpu_flags"]["amx_tile"]
        assert not torch_cpu["avx512_bf16"] or info["cpu_flags"]["avx512_bf16"]
        assert not torch_cpu["avx512"] or info["cpu_flags"]["avx512f"]
    json.dumps(info)
