"""Budgets in transformers (`beam_budget`), the threshold -> Avg-K curve (measured, stored, exported),
and `beam-moe calibrate`."""

import json
import re
import shutil

import pytest
import torch
from transformers import AutoConfig

from beam_moe import (
    BeamConfig,
    BeamError,
    attach,
    beam_budget,
    beam_stats,
    from_pretrained,
    get_attachment,
    load_beam,
    read_threshold_curve,
    save_beam,
)
from beam_moe.base_models import load_base_model
from beam_moe.cli import main
from beam_moe.eval import measure_threshold_curve, perplexity
from beam_moe.merged import export_merged
from beam_moe.threshold_curve import ThresholdCurve
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_model
from helpers.masking import randomize_heads
from helpers.serving_models import LM_HEAD_SCALE
from helpers.training import TOP4, sentences, write_text_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [0.2, 0.35, 0.5, 0.65, 0.8]
"""A short grid for the CLI tests: the curve's storage is under test there, not its resolution."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Top-4-of-8 Qwen3-MoE folder, an adapter on it with random heads (thresholds from
    0.2 to 0.8 keep from most to few of the slots) and a text file. The experts are scaled up so
    that the masks change the greedy tokens: with random tiny weights they barely move the logits."""
    root = tmp_path_factory.mktemp("budgets")
    base = tiny_model("qwen3_moe", vocab_size=BYTE_VOCAB_SIZE, **TOP4)
    with torch.no_grad():  # experts that matter and greedy choices decided by weights, not by rounding
        base.lm_head.weight.mul_(LM_HEAD_SCALE)
        for name, param in base.named_parameters():
            if ".experts." in name:
                param.mul_(5.0)
    base.save_pretrained(root / "base")
    byte_tokenizer().save_pretrained(root / "base")
    model = attach(load_base_model(root / "base"), BeamConfig(head="linear"))
    randomize_heads(model, seed=1, std=0.3)
    save_beam(model, root / "adapter")
    write_text_jsonl(root / "text.jsonl", n=120)
    return root


@pytest.fixture
def model(folders):
    return load_beam(load_base_model(folders / "base"), folders / "adapter")


def prompts(rows: int, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (rows, length), generator=torch.Generator().manual_seed(seed))


def kept(model, ids) -> int:
    with torch.no_grad(), beam_stats(model) as stats:
        model(ids)
    return stats.kept_pairs


# (a) one threshold per batch row -----------------------------------------------------------------


def test_per_row_thresholds_match_each_row_alone(model):
    ids = prompts(3)
    thresholds = [0.3, 0.5, 0.7]
    alone = []
    for row, threshold in enumerate(thresholds):
        with torch.no_grad(), beam_budget(model, threshold=threshold):
            alone.append(model(ids[row : row + 1]).logits[0])
    with beam_budget(model, threshold=0.3):
        low = kept(model, ids[:1])
    with beam_budget(model, threshold=0.7):
        high = kept(model, ids[:1])
    assert low > high, "the thresholds keep different experts: the comparison below can tell them apart"
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)
    with torch.no_grad(), beam_budget(model, threshold=thresholds) as chosen:
        batched = model(ids).logits
    assert chosen == thresholds
    for row in range(3):
        torch.testing.assert_close(batched[row], alone[row], atol=1e-5, rtol=1e-5)


def test_per_row_thresholds_in_generate(model):
    ids = prompts(2, seed=4)
    thresholds = [0.25, 0.75]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = []
    for row, threshold in enumerate(thresholds):
        with beam_budget(model, threshold=threshold):
            alone.append(
                model.generate(ids[row : row + 1], attention_mask=torch.ones_like(ids[:1]), **settings)
            )
    with beam_budget(model, threshold=thresholds):
        batched = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    for row in range(2):
        assert torch.equal(batched[row], alone[row][0])
    with beam_budget(model, threshold=thresholds[::-1]):
        swapped = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    assert not torch.equal(swapped, batched), "each row follows its own threshold, not the batch's first"


def test_thresholds_come_back_after_the_block_and_blocks_nest(model):
    layers = get_attachment(model).layers
    with beam_budget(model, threshold=0.3):
        with beam_budget(model, threshold=[0.4, 0.6]):
            assert torch.equal(layers[0].threshold, torch.tensor([0.4, 0.6]))
            assert layers[0].threshold.dtype == torch.float32
        assert all(layer.threshold == 0.3 for layer in layers)
    assert all(layer.threshold is None for layer in layers)
    with pytest.raises(RuntimeError), beam_budget(model, threshold=0.9):
        raise RuntimeError("the block fails")
    assert all(layer.threshold is None for layer in layers)


# (b) budgets in experts, read through the measured curve ------------------------------------------


def test_avg_k_budgets_land_within_ten_percent_on_the_measured_text(model, folders):
    text = folders / "text.jsonl"
    curve = measure_threshold_curve(model, _tokenizer(folders), text, max_tokens=2048)
    assert curve.measured_on == {"text": "text.jsonl", "tokens": 2048}
    assert curve.top_k == 4 and len(curve.thresholds) == 33
    assert set(curve.layers) == {layer.name for layer in get_attachment(model).layers}
    low, high = curve.avg_k_range
    assert low < 1.0 and high > 3.0, "the random heads span most of the budgets"
    assert all(layer.threshold is None for layer in get_attachment(model).layers), "overrides restored"
    get_attachment(model).threshold_curve = curve
    for budget in (1.0, 2.0, 3.0):
        with beam_budget(model, avg_k=budget) as threshold:
            measured = perplexity(model, _tokenizer(folders), text, max_tokens=2048).avg_k
        assert threshold == pytest.approx(curve.threshold_for(budget))
        assert measured == pytest.approx(budget, rel=0.10)
    with beam_budget(model, avg_k=[1.0, 3.0]) as chosen:
        assert chosen == [pytest.approx(curve.threshold_for(1.0)), pytest.approx(curve.threshold_for(3.0))]


def test_the_curve_falls_as_the_threshold_rises_and_matches_eval(model, folders):
    curve = measure_threshold_curve(model, _tokenizer(folders), sentences(40), thresholds=[0.3, 0.5, 0.7])
    assert curve.measured_on["text"] == "40 given texts"
    assert curve.avg_k[0] > curve.avg_k[1] > curve.avg_k[2]
    with beam_budget(model, threshold=0.5):
        reference = perplexity(model, _tokenizer(folders), sentences(40), max_tokens=4096)
    assert curve.avg_k[1] == pytest.approx(reference.avg_k)
    for name, values in curve.layers.items():
        assert values[1] == pytest.approx(reference.per_layer[name])


# (c) refused values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(threshold=1.5), r"beam_budget threshold: beam_threshold must lie strictly between 0 and 1"),
        (dict(threshold=0.0), r"beam_threshold must lie strictly between 0 and 1"),
        (dict(threshold=[0.5, "x"]), r"beam_budget threshold\[1\]: beam_threshold must be a number"),
        (dict(threshold=[0.5, True]), r"threshold\[1\]: beam_threshold must be a number"),
        (dict(threshold=[]), r"threshold is an empty sequence"),
        (dict(avg_k=2.0), r"beam_budget avg_k: beam_avg_k needs a calibrated checkpoint"),
        (dict(avg_k=2.0, threshold=0.5), r"avg_k or threshold, not both"),
        ({}, r"needs avg_k .* or threshold"),
        (dict(threshold=torch.ones(2, 2) / 2), r"threshold must be a number or one number per batch row"),
    ],
)
def test_bad_budgets_are_refused_naming_the_field(model, kwargs, message):
    with pytest.raises(BeamError, match=message), beam_budget(model, **kwargs):
        pass
    assert all(layer.threshold is None for layer in get_attachment(model).layers)


def test_budgets_outside_the_calibrated_range_are_refused(model):
    get_attachment(model).threshold_curve = ThresholdCurve([0.3, 0.5, 0.7], [3.5, 2.0, 1.0], top_k=4)
    refused = r"avg_k\[1\]: beam_avg_k must lie between 1.000 and 3.500"
    with pytest.raises(BeamError, match=refused), beam_budget(model, avg_k=[2.0, 0.5]):
        pass
    with pytest.raises(BeamError, match=r"beam_avg_k must be a number"), beam_budget(model, avg_k="2"):
        pass
    with beam_budget(model, avg_k=2.0) as threshold:
        assert threshold == pytest.approx(0.5)


def test_per_row_thresholds_must_match_the_batch(model):
    with (
        beam_budget(model, threshold=[0.3, 0.5, 0.7]),
        pytest.raises(BeamError, match="3 per-row thresholds"),
    ):
        model(prompts(2, length=4))


# Storage: the adapter, load_beam, export and from_pretrained ------------------------------------


def test_the_curve_travels_from_the_adapter_to_the_merged_checkpoint(model, folders, tmp_path):
    curve = ThresholdCurve(
        [0.3, 0.5, 0.7], [3.5, 2.0, 1.0], top_k=4, measured_on={"text": "t.jsonl", "tokens": 10}
    )
    save_beam(model, tmp_path / "adapter", threshold_curve=curve)
    assert (
        json.loads((tmp_path / "adapter" / "beam_config.json").read_text())["threshold_curve"]
        == curve.to_dict()
    )
    assert read_threshold_curve(tmp_path / "adapter") == curve
    loaded = load_beam(load_base_model(folders / "base"), tmp_path / "adapter")
    assert get_attachment(loaded).threshold_curve == curve

    merged = export_merged(tmp_path / "adapter", tmp_path / "merged", model=folders / "base")
    config = json.loads((merged / "config.json").read_text())
    assert config["beam_export"]["threshold_curve"] == curve.to_dict()
    hf_config = AutoConfig.from_pretrained(merged)
    assert ThresholdCurve.from_dict(hf_config.beam_export["threshold_curve"]) == curve
    assert json.loads((merged / "beam_config.json").read_text())["threshold_curve"] == curve.to_dict()
    assert get_attachment(from_pretrained(merged)).threshold_curve == curve


def test_an_adapter_without_a_curve_exports_none(folders, tmp_path):
    merged = export_merged(folders / "adapter", tmp_path / "merged", model=folders / "base")
    assert "threshold_curve" not in json.loads((merged / "config.json").read_text())["beam_export"]
    assert read_threshold_curve(merged) is None
    assert get_attachment(from_pretrained(merged)).threshold_curve is None


def test_a_damaged_curve_is_refused_on_load(model, folders, tmp_path):
    save_beam(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "beam_config.json"
    document = json.loads(path.read_text())
    document["threshold_curve"] = {"thresholds": [0.5, 0.3], "avg_k": [1, 2], "top_k": 4}
    path.write_text(json.dumps(document))
    with pytest.raises(BeamError, match=r"threshold curve in .*beam_config.json.*strictly increasing"):
        load_beam(load_base_model(folders / "base"), tmp_path / "adapter")


# (d) beam-moe calibrate ------------------------------------------------------------------------


def copy_adapter(folders, where):
    return shutil.copytree(folders / "adapter", where)


def calibrate(capsys, *argv) -> dict:
    code = main(["calibrate", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_calibrate_stores_the_curve_in_an_adapter(folders, tmp_path, capsys):
    adapter = copy_adapter(folders, tmp_path / "adapter")
    weights = (adapter / "beam_adapter.safetensors").read_bytes()
    text = folders / "text.jsonl"
    result = calibrate(capsys, adapter, "--data", text, "--max-tokens", 512, "--thresholds", *GRID)
    assert result["kind"] == "adapter"
    stored = json.loads((adapter / "beam_config.json").read_text())["threshold_curve"]
    assert stored == result["threshold_curve"]
    curve = ThresholdCurve.from_dict(stored)
    assert curve.thresholds == GRID and curve.measured_on == {"text": "text.jsonl", "tokens": 512}
    assert curve.avg_k[0] > curve.avg_k[-1]
    assert result["avg_k_range"] == [curve.avg_k_range[0], curve.avg_k_range[1]]
    assert (adapter / "beam_adapter.safetensors").read_bytes() == weights
    model = load_beam(load_base_model(folders / "base"), adapter)
    assert get_attachment(model).threshold_curve == curve
    expected = measure_threshold_curve(model, _tokenizer(folders), text, thresholds=GRID, max_tokens=512)
    assert curve.avg_k == pytest.approx(expected.avg_k)

    assert main(["calibrate", str(adapter), "--data", str(text), "--max-tokens", "256"]) == 0
    table = capsys.readouterr().out
    assert "threshold  Avg-K" in table and "Avg-K range" in table and "beam_config.json" in table
    assert len(read_threshold_curve(adapter).thresholds) == 33, "the default grid"


def test_calibrate_stores_the_curve_in_a_merged_checkpoint(folders, tmp_path, capsys):
    merged = export_merged(folders / "adapter", tmp_path / "merged", model=folders / "base")
    result = calibrate(
        capsys, merged, "--data", folders / "text.jsonl", "--max-tokens", 512, "--thresholds", *GRID
    )
    assert result["kind"] == "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["beam_export"]["threshold_curve"] == result["threshold_curve"]
    assert (
        json.loads((merged / "beam_config.json").read_text())["threshold_curve"] == result["threshold_curve"]
    )
    assert config["architectures"] == ["BeamQwen3MoeForCausalLM"], "the rest of config.json is kept"
    model = from_pretrained(merged)
    assert get_attachment(model).threshold_curve.to_dict() == result["threshold_curve"]
    with beam_budget(model, avg_k=2.0):
        pass


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("base", [], r"no BEAM adapter at .*beam_config.json is missing"),
        ("missing", [], r"does not exist"),
        ("adapter", ["--data", "nope.jsonl"], r"nope.jsonl does not exist"),
        ("adapter", ["--thresholds", "0.5", "0.3"], r"--thresholds must be strictly increasing"),
        ("adapter", ["--thresholds", "0.5", "1.0"], r"--thresholds must lie strictly between 0 and 1"),
        ("adapter", ["--max-tokens", "1"], r"--max-tokens must be at least 2"),
    ],
)
def test_calibrate_refuses_bad_input_and_writes_nothing(folders, tmp_path, capsys, target, extra, message):
    adapter = copy_adapter(folders, tmp_path / "adapter")
    before = (adapter / "beam_config.json").read_text()
    path = {"base": folders / "base", "missing": tmp_path / "missing", "adapter": adapter}[target]
    data = [] if "--data" in extra else ["--data", str(folders / "text.jsonl")]
    assert main(["calibrate", str(path), *data, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("beam-moe calibrate: error: ")
    assert re.search(message, err), err
    assert (adapter / "beam_config.json").read_text() == before


# The end of beam-moe train ---------------------------------------------------------------------


def test_train_stores_the_curve_unless_asked_not_to(folders, tmp_path, capsys):
    common = [
        "train", "--model", str(folders / "base"), "--data", str(folders / "text.jsonl"),
        "--target-avg-k", "2", "--max-steps", "2", "--batch-size", "2", "--max-length", "32",
        "--calibration-tokens", "256", "--curve-tokens", "512", "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "budgets" in out and "Avg-K" in out
    curve = read_threshold_curve(tmp_path / "run")
    assert curve is not None and len(curve.thresholds) == 33
    assert curve.measured_on["text"].startswith("the run's held-out share")
    assert 0 < curve.measured_on["tokens"] <= 512 + 32
    assert main([*common, "--output", str(tmp_path / "plain"), "--no-threshold-curve"]) == 0
    assert read_threshold_curve(tmp_path / "plain") is None
    assert "budgets" not in capsys.readouterr().out


def _tokenizer(folders):
    from beam_moe.base_models import load_tokenizer

    return load_tokenizer(folders / "base")


def test_a_failed_curve_measurement_keeps_the_saved_adapter(folders, tmp_path, monkeypatch):
    from beam_moe.errors import BeamWarning
    from beam_moe.eval import curve
    from beam_moe.train import TrainConfig, train

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(curve, "curve_on_batches", fail)
    config = TrainConfig(
        model=str(folders / "base"), data=[str(folders / "text.jsonl")], output=str(tmp_path / "run"),
        target_avg_k=2.0, max_steps=1, batch_size=2, max_length=32, calibration_tokens=128,
        progress=False, tensorboard=False,
    )  # fmt: skip
    with pytest.warns(BeamWarning, match=r"the adapter is saved.*OutOfMemoryError.*beam-moe calibrate"):
        result = train(config)
    assert "curve_avg_k_range" not in result.metrics
    assert (tmp_path / "run" / "beam_config.json").is_file()
    assert read_threshold_curve(tmp_path / "run") is None


def test_info_shows_the_budgets_a_checkpoint_serves(model, folders, tmp_path, capsys):
    curve = ThresholdCurve(
        [0.3, 0.5, 0.7], [3.5, 2.0, 1.0], top_k=4, measured_on={"text": "t.jsonl", "tokens": 10}
    )
    save_beam(model, tmp_path / "adapter", threshold_curve=curve)
    merged = export_merged(tmp_path / "adapter", tmp_path / "merged", model=folders / "base")
    for path in (tmp_path / "adapter", merged):
        assert main(["info", str(path), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["budgets"]
        assert shown == "Avg-K 1.000 to 3.500 (threshold curve on 10 tokens of t.jsonl)"
    assert main(["info", str(folders / "adapter"), "--json"]) == 0
    assert "beam-moe calibrate" in json.loads(capsys.readouterr().out)["budgets"]
