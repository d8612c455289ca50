"""`beam-moe quickstart` end to end on the packaged reference MoE (tiny settings), and its refusals."""

import json
import math
import os

import pytest

from beam_moe.cli import main
from beam_moe.experiments.refmoe.compare import interpolate_top_k
from beam_moe.experiments.refmoe.corpus import corpus_is_ready, default_data_dir
from beam_moe.experiments.refmoe.experiment import pieces

TINY = [
    "--steps", "4", "--batch-size", "2", "--max-length", "64", "--eval-blocks", "2", "--eval-length", "64",
    "--points", "2", "--bench-tokens", "8,64", "--bench-rounds", "3", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus():
    if not corpus_is_ready(default_data_dir()):
        pytest.skip("the corpus has not been prepared (scripts/setup.sh prepares it)")
    return default_data_dir()


def test_quickstart_writes_the_report(corpus, tmp_path, capsys):
    out = tmp_path / "qs"
    out.mkdir()  # an earlier report: --overwrite replaces it as a whole
    (out / "results.json").write_text("{}")
    (out / "stale.txt").write_text("from the earlier report")
    old_umask = os.umask(0o022)
    try:
        assert main(["quickstart", "-o", str(out), "--target-avg-k", "2", "--overwrite", *TINY]) == 0
    finally:
        os.umask(old_umask)
    captured = capsys.readouterr()
    printed = captured.out
    # --no-progress: no bars, but one line per finished stage with its time (and throughput)
    stages = ["training text", "train mask heads", "evaluate", "MoE-layer speed", "report"]
    for i, stage in enumerate(stages, 1):
        assert f"quickstart [{i}/5] {stage}: " in captured.err, captured.err
    assert "training tokens/s" in captured.err and "evaluated tokens/s" in captured.err
    assert not (out / "stale.txt").exists()
    for path in [out, *out.rglob("*")]:  # readable by others, as the umask allows
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    assert "| **BEAM** |" in printed and "Top-K pruning" in printed and "report:" in printed

    for name in ("report.md", "results.json", "sweep.md", "sweep.png", "adapter/beam_config.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "analysis").glob("*.png"))
    doc = json.loads((out / "results.json").read_text())
    comp = doc["comparison"]
    assert comp["top_k"] == 8 and set(comp["baselines"]) == {"top_k", "top_p", "threshold"}
    assert 0.0 < comp["avg_k"] < 8.0 and math.isfinite(comp["beam_ppl"]) and comp["base_ppl"] > 1.0
    # The base model is Top-8: its perplexity is the sweep's base point, and BEAM saves FLOPs.
    base = next(p for p in doc["sweep"]["points"] if p["method"] == "base")
    assert base["avg_k"] == pytest.approx(8.0) and base["ppl"] == comp["base_ppl"]
    assert 0.0 < comp["beam_moe_flops_reduction"] < 1.0
    for name in ("top_p", "threshold"):  # calibrated to BEAM's Avg-K on the same text
        entry = comp["baselines"][name]
        assert entry["reached"] == (abs(entry["avg_k"] - comp["avg_k"]) <= 0.01)
    assert comp["within_5_percent"] == (comp["beam_ppl"] <= 1.05 * comp["base_ppl"])
    assert doc["training"]["steps"] == 4
    speed = doc["speed"]
    assert set(speed["tokens"]) == {"8", "64"}
    for row in speed["tokens"].values():
        assert row["base"]["moe_ms"] > 0 and row["BEAM"]["moe_ms"] > 0
        assert row["BEAM"]["moe_ms"] < row["BEAM"]["forward_ms"]
    report = (out / "report.md").read_text()
    assert f"{comp['beam_ppl']:.3f}" in report and f"{comp['base_ppl']:.3f}" in report
    assert "## Goals" in report and "## Speed of the MoE layers" in report

    # A finished report is replaced only with --overwrite.
    assert main(["quickstart", "--output", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-avg-k", "9"], "--target-avg-k"),
        (["--target-avg-k", "0"], "--target-avg-k"),
        (["--steps", "0"], "steps"),
        (["--eval-blocks", "0"], "--eval-blocks"),
        (["--bench-tokens", "8,x"], "--bench-tokens"),
        (["--bench-tokens", "1000"], "--bench-tokens"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_that_is_not_a_quickstart_output_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["quickstart", "--output", str(tmp_path), "--overwrite"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_top_k_is_interpolated_between_whole_numbers_in_log_perplexity():
    points = [{"method": "top_k", "avg_k": float(k), "ppl": p} for k, p in [(1, 40.0), (2, 20.0), (8, 10.0)]]
    assert interpolate_top_k(points, 1.5) == pytest.approx(math.sqrt(40.0 * 20.0))
    assert interpolate_top_k(points, 2.0) == pytest.approx(20.0)
    assert interpolate_top_k(points, 0.5) is None  # below the curve: no Top-0 point here


def test_pieces_cut_at_line_breaks_and_keep_all_text():
    text = "\n".join(f"line {i} " + "x" * 90 for i in range(100))
    cut = pieces(text, size=1000)
    assert all(len(p) < 1200 for p in cut) and len(cut) == 10
    assert "\n".join(cut) == text


def test_mask_and_router_adapters_are_compared_with_baselines_on_the_stock_model(corpus, tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--output", str(out), "--train", "mask+router", "--no-bench", *TINY]
    assert main([a for a in argv if a not in ("--bench-tokens", "8,64", "--bench-rounds", "3")]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert (out / "adapter" / "trained_routers.safetensors").is_file()
    assert "stock model" in doc["sweep"]["config"]["routers"]
    assert doc["speed"] is None and "skipped" in (out / "report.md").read_text()
    base = next(p for p in doc["sweep"]["points"] if p["method"] == "base")
    assert base["ppl"] == doc["comparison"]["base_ppl"]
    assert set(doc["comparison"]["baselines"]) == {"top_k", "top_p", "threshold"}


def test_verdicts_say_how_each_baseline_was_compared():
    """Top-K pruning has whole numbers of experts only: its number at BEAM's fractional Avg-K is
    interpolated, and the verdict says so; a calibrated baseline's is measured."""
    from beam_moe.experiments.refmoe.compare import verdict_lines

    comp = {
        "avg_k": 1.56, "top_k": 8, "beam_ppl": 83.59, "base_ppl": 65.0, "ppl_increase": 0.286,
        "within_5_percent": False,
        "baselines": {
            "top_k": {"beam_better": True, "ppl_at_equal_avg_k": 84.237, "ppl_interpolated": 84.237, "avg_k": 2.0},
            "top_p": {"beam_better": False, "ppl_at_equal_avg_k": 80.1, "avg_k": 1.57},
        },
    }  # fmt: skip
    lines = verdict_lines(comp)
    top_k = next(line for line in lines if "Top-K pruning" in line)
    assert (
        "(83.590 vs 84.237; Top-K pruning interpolated to Avg-K 1.56 between its measured k = 1 and k = 2"
        in top_k
    )
    top_p = next(line for line in lines if "Top-P" in line)
    assert "**not better** (83.590 vs 80.100; Top-P measured at Avg-K 1.57)" in top_p


def test_sweep_plot_draws_every_point_on_a_log_axis():
    """The left panel is logarithmic even when the k = 0 point is only a few times the base's (a
    linear axis squashed every curve under it); the zoomed panel stays linear."""
    from beam_moe.eval.plots import sweep_figure

    points = [{"method": "base", "avg_k": 8.0, "ppl": 60.0, "label": "base"}]
    points += [
        {"method": "top_k", "avg_k": float(k), "ppl": 60.0 + 300.0 / (k + 1), "label": f"k={k}"}
        for k in range(9)
    ]
    points += [{"method": "beam", "avg_k": 1.5, "ppl": 75.0, "label": "BEAM"}]
    figure = sweep_figure({"points": points, "matched": [], "config": {"top_k": 8}})
    full, zoom = figure.axes[:2]
    assert full.get_yscale() == "log" and zoom.get_yscale() == "linear"
