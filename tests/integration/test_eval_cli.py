"""`beam-moe eval`, `analyze` and `sweep` end to end on tiny model folders, and their errors."""

import json
import re

import pytest

from beam_moe import attach, save_beam
from beam_moe.base_models import load_base_model
from beam_moe.cli import main
from beam_moe.tiny_models import save_tiny
from helpers.masking import randomize_heads

TEXT = [
    "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas.",
    "The cello is a bowed string instrument, usually tuned in perfect fifths.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    save_tiny("qwen3_moe", root / "model", num_experts_per_tok=4)
    model = attach(load_base_model(root / "model"))
    randomize_heads(model, seed=0)
    save_beam(model, root / "adapter")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    return root


def run_json(capsys, *argv):
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_eval_adapter_model_folder_and_baseline(folders, capsys):
    text = str(folders / "text.jsonl")
    beam = run_json(capsys, "eval", str(folders / "adapter"), "--ppl", text, "--json")
    assert beam["base_model"] == str(folders / "model")
    assert beam["routing"] == {"method": "beam"}
    assert 0.5 < beam["avg_k"] < 3.5
    assert beam["perplexity"]["avg_k"] == beam["avg_k"]
    assert len(beam["perplexity"]["per_layer"]) == 2
    assert beam["flops"]["mask_head"] is True
    assert 0 < beam["flops"]["moe_flops_reduction"] < 1

    base = run_json(capsys, "eval", str(folders / "model"), "--ppl", text, "--json")
    assert base["adapter"] is None
    assert base["avg_k"] == 4.0
    assert base["routing"] == {"method": "base"}
    assert base["flops"]["moe_flops_reduction"] == 0.0, "a base model runs no mask head"

    noop = run_json(
        capsys,
        "eval",
        str(folders / "adapter"),
        "--ppl",
        text,
        "--baseline",
        "top_p",
        "--param",
        "1",
        "--json",
    )
    assert noop["perplexity"]["ppl"] == base["perplexity"]["ppl"]
    assert noop["flops"]["moe_flops_reduction"] == 0.0

    matched = run_json(
        capsys,
        "eval",
        str(folders / "adapter"),
        "--ppl",
        text,
        "--baseline",
        "random",
        "--target-avg-k",
        "2",
        "--json",
    )
    calibration = matched["routing"]["calibration"]
    assert calibration["target_avg_k"] == 2.0 and calibration["reached"]
    # Calibrated on the evaluation text (fewer tokens than --calibration-tokens): the same Avg-K.
    assert matched["avg_k"] == pytest.approx(calibration["avg_k"], abs=1e-9)
    assert abs(matched["avg_k"] - 2.0) <= 0.01

    assert (
        main(["eval", str(folders / "adapter"), "--ppl", text, "--output", str(folders / "eval.json")]) == 0
    )
    shown = capsys.readouterr().out
    assert "perplexity" in shown and "MoE FLOPs" in shown
    assert json.loads((folders / "eval.json").read_text())["routing"]["method"] == "beam"


def test_eval_names_the_expert_backend_that_ran(folders, capsys):
    """The JSON has the per-layer record, the table one line that says which backend computed."""
    text = str(folders / "text.jsonl")
    beam = run_json(capsys, "eval", str(folders / "adapter"), "--ppl", text, "--json")
    backends = beam["perplexity"]["backends"]
    assert list(backends) == list(beam["perplexity"]["per_layer"])
    assert all(list(calls) == ["grouped"] for calls in backends.values()), "auto on the CPU is grouped"
    assert main(["eval", str(folders / "adapter"), "--ppl", text]) == 0
    assert "experts     run by grouped in every layer" in capsys.readouterr().out


def test_experts_ran_gives_each_backends_share():
    from beam_moe.cli.eval import experts_ran

    mixed = {"a": {"triton": 3}, "b": {"grouped": 1}}
    assert experts_ran(mixed) == "run by triton 75%, grouped 25% of the layer calls"


def test_eval_with_lm_eval_tasks(folders, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = run_json(
        capsys, "eval", str(folders / "adapter"), "--tasks", "beam_wiki_cloze", "--limit", "2", "--json"
    )
    assert "perplexity" not in out
    assert 0 <= out["lm_eval"]["results"]["beam_wiki_cloze"]["acc,none"] <= 1
    assert out["avg_k"] == pytest.approx(out["lm_eval"]["avg_k"])


def test_analyze_writes_plots_and_a_summary(folders, capsys):
    out = folders / "analysis"
    summary = run_json(
        capsys,
        "analyze",
        str(folders / "adapter"),
        "--data",
        str(folders / "text.jsonl"),
        "--output",
        str(out),
        "--json",
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "avg_k_per_layer.png",
        "expert_load.png",
        "keep_rate_by_rank.png",
        "summary.json",
        "token_map.png",
    ]
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    layer = summary["layers"][0]
    assert len(layer["keep_rate_by_rank"]) == 4
    assert sum(layer["load_before"]) == pytest.approx(4.0)  # every token sends K = 4 pairs
    assert sum(layer["load_after"]) == pytest.approx(layer["avg_k"])
    assert sum(summary["kept_histogram"]) == pytest.approx(1.0)
    assert len(summary["token_map"]["tokens"]) == 48
    assert json.loads((out / "summary.json").read_text())["avg_k"] == summary["avg_k"]

    top_p = run_json(
        capsys,
        "analyze",
        str(folders / "adapter"),
        "--data",
        str(folders / "text.jsonl"),
        "--output",
        str(out),
        "--baseline",
        "top_p",
        "--param",
        "0.5",
        "--overwrite",
        "--json",
    )
    assert top_p["keep_rate_by_rank"][0] == 1.0, "Top-P always keeps the router's favourite"


def test_sweep_writes_table_json_and_plot(folders, capsys):
    out = folders / "sweep"
    assert (
        main(
            [
                "sweep",
                str(folders / "adapter"),
                "--ppl",
                str(folders / "text.jsonl"),
                "--output",
                str(out),
                "--baselines",
                "top_k,top_p",
                "--points",
                "3",
                "--calibration-tokens",
                "100000",  # all of the evaluation text: calibration and evaluation see the same tokens
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "At matched Avg-K" in shown
    result = json.loads((out / "sweep.json").read_text())
    methods = [p["method"] for p in result["points"]]
    assert methods == ["base", "beam"] + ["top_k"] * 5 + ["top_p"] * 3
    assert result["config"]["calibration_data"] == result["config"]["data"] == str(folders / "text.jsonl")
    (row,) = result["matched"]
    beam = result["points"][1]
    assert row["target_avg_k"] == beam["avg_k"] and 0.5 < beam["avg_k"] < 3.5
    assert set(row["baselines"]) == {"top_k", "top_p"}
    for matched in row["baselines"].values():
        calibration = matched["calibration"]
        assert calibration["target_avg_k"] == beam["avg_k"]
        # Calibrated on the evaluation text itself: its Avg-K there is the one measured in the sweep.
        assert matched["avg_k"] == pytest.approx(calibration["avg_k"], abs=1e-9)
        assert [t["avg_k"] for t in calibration["tried"] if t["param"] == matched["param"]] == [
            calibration["avg_k"]
        ]
    top_p = row["baselines"]["top_p"]
    assert top_p["calibration"]["reached"]
    assert abs(top_p["avg_k"] - beam["avg_k"]) <= 0.01  # the calibration tolerance
    # Top-K pruning keeps a whole number of experts: the nearer of the two around BEAM's Avg-K.
    top_k = row["baselines"]["top_k"]
    assert top_k["avg_k"] == top_k["param"]
    assert top_k["param"] == round(beam["avg_k"])
    base = result["points"][0]
    top_k_noop = next(p for p in result["points"] if p["method"] == "top_k" and p["param"] == 4)
    assert top_k_noop["ppl"] == base["ppl"]
    assert (out / "sweep.md").read_text().startswith("| method |")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ppl", "{root}/missing.jsonl"], "missing.jsonl does not exist"),
        (["--ppl", "{root}/empty.txt"], "no text in"),
        (["--baseline", "top_q", "--param", "1"], "unknown baseline 'top_q'"),
        (["--baseline", "top_p", "--param", "1.5"], r"p must lie in \[0, 1\]"),
        (["--baseline", "top_k", "--param", "9"], r"k must lie in \[0, 4\]"),
        (["--baseline", "top_p"], "needs exactly one of --param P or --target-avg-k"),
        (["--param", "0.5"], "need --baseline"),
    ],
)
def test_eval_bad_input_exits_non_zero(folders, capsys, extra, message):
    (folders / "empty.txt").write_text("\n")
    argv = ["eval", str(folders / "adapter"), *[a.format(root=folders) for a in extra]]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_failed_runs_leave_no_output(folders, capsys):
    out = folders / "never"
    assert (
        main(
            ["analyze", str(folders / "nowhere"), "--data", str(folders / "text.jsonl"), "--output", str(out)]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep", "--ppl", str(folders / "text.jsonl"), "--output", str(out)]) == 2
    assert "give BEAM adapter folders, or --model BASE" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                str(folders / "adapter"),
                "--ppl",
                str(folders / "text.jsonl"),
                "--output",
                str(out),
                "--baselines",
                "nope",
            ]
        )
        == 2
    )
    assert "unknown baseline 'nope'" in capsys.readouterr().err
    assert not out.exists()
