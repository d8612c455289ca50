"""`beam-moe train`: a full run through the CLI, and every kind of bad input."""

import json
import subprocess
import sys

import pytest
import torch

from beam_moe import beam_stats, load_beam
from beam_moe.base_models import load_base_model, load_tokenizer
from beam_moe.cli import main
from beam_moe.tiny_models import byte_tokenizer, save_tiny
from beam_moe.train.data import load_training_data
from helpers.training import model_dir, write_chat_jsonl, write_text_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    model_dir(path / "model")
    write_text_jsonl(path / "text.jsonl", n=80)
    write_chat_jsonl(path / "chat.jsonl", n=60)
    return path


def args(files, output, *extra):
    return [
        "train", "--model", str(files / "model"), "--data", str(files / "text.jsonl"),
        "--output", str(files / output), "--max-steps", "3", "--batch-size", "2", "--max-length", "32",
        "--no-progress", *extra,
    ]  # fmt: skip


def held_out_avg_k(output):
    """Avg-K of the adapter in `output`, loaded onto the bf16 base, on the run's held-out blocks
    (real tokens only, the run's validation batches), computed here from the routing records."""
    run = json.loads((output / "training_args.json").read_text())
    model = load_beam(load_base_model(run["model"], "bfloat16"), output)
    tokenizer = load_tokenizer(run["model"])
    val = load_training_data(
        run["data"], None, tokenizer, run["max_length"], run["packing"], run["val_fraction"], run["seed"]
    ).val
    kept = tokens = 0.0
    for start in range(0, len(val), run["batch_size"]):
        batch = val.batch(list(range(start, min(start + run["batch_size"], len(val)))))
        with torch.no_grad(), beam_stats(model, record=True) as stats:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        real = batch["attention_mask"].reshape(-1).bool()
        kept += sum(float(records[0].keep[real].sum()) for records in stats.records) / len(stats.records)
        tokens += float(real.sum())
    return kept / tokens


def test_chat_distillation_in_bf16_with_accumulation_writes_a_complete_folder(files, capsys):
    output = files / "chat-run"
    extra = ["--target-avg-k", "2", "--objective", "lm+distill", "--dtype", "bf16", "--grad-accum", "2"]
    extra += ["--data", str(files / "chat.jsonl"), "--save-every", "2", "--json"]
    code = main(args(files, "chat-run", *extra))
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    assert summary["val_avg_k"] == pytest.approx(held_out_avg_k(output), abs=1e-6)
    assert summary["val_avg_k"] < 4, "the heads moved away from keep-all"
    names = {p.name for p in output.iterdir()}
    expected = {"beam_config.json", "beam_adapter.safetensors", "training_args.json", "metrics.jsonl"}
    assert expected | {"checkpoints", "tensorboard"} <= names
    assert list((output / "tensorboard").iterdir()), "TensorBoard events are written when it is installed"
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "split" not in m] == [1, 2, 3]
    assert all(m["kl"] >= 0 for m in steps if "kl" in m)
    assert json.loads((output / "training_args.json").read_text())["objective"] == "lm+distill"
    document = json.loads((output / "beam_config.json").read_text())
    assert document["extra"]["dtypes"] == {"experts": "bfloat16", "mask_heads": "float32"}
    load_beam(load_base_model(files / "model"), output)

    # The same first step in fp32: bf16 arithmetic gives a close but different loss.
    fp32 = [a for a in args(files, "chat-fp32", *extra) if a != "--json"]
    fp32[fp32.index("bf16")] = "fp32"
    fp32[fp32.index("--max-steps") + 1] = "1"
    assert main(fp32) == 0
    first = json.loads((files / "chat-fp32" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == steps[0]["step"] == 1
    assert 1e-5 < abs(first["lm_loss"] - steps[0]["lm_loss"]) < 0.05 * first["lm_loss"]
    fp32_document = json.loads((files / "chat-fp32" / "beam_config.json").read_text())
    assert fp32_document["extra"]["dtypes"] == {"experts": "float32", "mask_heads": "float32"}


def assert_refused(files, argv, message, capsys, output):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (files / output / "beam_config.json").exists()


def test_missing_empty_and_malformed_data(files, capsys):
    (files / "empty.jsonl").write_text("")
    (files / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    for data, message in [
        ("missing.jsonl", "missing.jsonl does not exist"),
        ("empty.jsonl", "the data is empty"),
        ("broken.jsonl", "broken.jsonl:2: not valid JSON"),
    ]:
        argv = args(files, "bad-data", "--beta", "0.1")
        argv[argv.index("--data") + 1] = str(files / data)
        assert_refused(files, argv, message, capsys, "bad-data")
        assert not (files / "bad-data").exists(), "nothing is written before the inputs are checked"


def test_models_without_moe_layers(files, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=261
        )
    )
    dense.save_pretrained(files / "llama")
    byte_tokenizer().save_pretrained(files / "llama")
    argv = [*args(files, "dense", "--beta", "0.1"), "--model", str(files / "llama")]
    assert_refused(files, argv, "does not support model type 'llama'", capsys, "dense")
    save_tiny("qwen3_moe", files / "all-dense", mlp_only_layers=[0, 1])
    argv = [*args(files, "dense", "--beta", "0.1"), "--model", str(files / "all-dense")]
    assert_refused(files, argv, "found no MoE blocks", capsys, "dense")


@pytest.mark.parametrize(("target", "message"), [("5", "out of range"), ("0", "must be > 0")])
def test_targets_out_of_range(files, capsys, target, message):
    assert_refused(files, args(files, "target", "--target-avg-k", target), message, capsys, "target")


def test_a_finished_run_is_kept_unless_overwrite(files, capsys):
    assert main(args(files, "done", "--beta", "0.1")) == 0
    before = (files / "done" / "beam_adapter.safetensors").read_bytes()
    assert main(args(files, "done", "--beta", "0.1")) == 2
    assert "already holds a beam-moe training run; pass --overwrite" in capsys.readouterr().err
    assert (files / "done" / "beam_adapter.safetensors").read_bytes() == before
    assert main(args(files, "done", "--beta", "0.1", "--resume")) == 2
    assert main(args(files, "done", "--beta", "0.5", "--overwrite")) == 0
    config = json.loads((files / "done" / "beam_config.json").read_text())
    assert config["extra"]["beta"] == 0.5
    (files / "other").mkdir()
    (files / "other" / "notes.txt").write_text("mine")
    assert main(args(files, "other", "--beta", "0.1", "--overwrite")) == 2
    assert "is not a beam-moe training run" in capsys.readouterr().err
    assert (files / "other" / "notes.txt").read_text() == "mine"


def test_repeated_data_options_add_up(files):
    """`--data a --data b c` trains on all three files, not only the last option's."""
    from beam_moe.cli import build_parser
    from beam_moe.cli.train import config_from_args

    a, b, c = (str(files / name) for name in ("text.jsonl", "chat.jsonl", "more.jsonl"))
    argv = [
        "train",
        "--beta",
        "0.1",
        "--model",
        "m",
        "--output",
        "o",
        "--data",
        a,
        "--data",
        b,
        c,
        "--val-data",
        a,
        "--val-data",
        b,
    ]
    config = config_from_args(build_parser().parse_args(argv))
    assert list(config.data) == [a, b, c]
    assert list(config.val_data) == [a, b]


def test_missed_target_warns_and_is_recorded(files):
    """The real command: a run that ends far from its target still exits 0, but says so on stderr
    and records `target_reached: false` in its JSON, its adapter and its last metrics line; the last
    step's validation is logged once (the final one, after calibration), not twice."""
    output = files / "missed"
    command = [
        sys.executable, "-m", "beam_moe.cli", *args(files, "missed"), "--target-avg-k", "1",
        "--start-avg-k", "4", "--no-calibrate", "--lr", "1e-7", "--eval-every", "3", "--json", "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["target_reached"] is False and summary["final_avg_k"] > 1.1
    assert "beam-moe train: warning: Avg-K ended at" in done.stderr
    assert "outside ±10% of the target 1" in done.stderr and "--no-calibrate" in done.stderr
    assert json.loads((output / "beam_config.json").read_text())["extra"]["final"]["target_reached"] is False
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in val] == [3], "one validation record for the last step"
    assert val[0]["target_reached"] is False and val[0]["val_avg_k"] == summary["val_avg_k"]


def test_train_quickstart_and_api_share_one_set_of_defaults():
    """Every `beam-moe train` option that is a TrainConfig field defaults to the field's default,
    and the quickstart's recipe takes its learning rate and controller from the same place."""
    import argparse
    import dataclasses

    from beam_moe.cli import build_parser
    from beam_moe.experiments.refmoe.experiment import Recipe
    from beam_moe.train import TrainConfig

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {a.dest: a.default for a in subparsers.choices["train"]._actions}
    fields = {
        f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
    }
    shared = [name for name in fields if name in options and options[name] is not None]
    assert {"lr", "controller_kp", "controller_ki", "settle", "batch_size", "max_length"} <= set(shared)
    for name in shared:
        assert options[name] == fields[name], name
    recipe = Recipe()
    for name in ("lr", "controller_kp", "controller_ki", "settle"):
        assert getattr(recipe, name) == fields[name], name


def test_every_train_config_field_is_an_option_with_the_field_default_and_help():
    """`beam-moe train`'s options are generated from TrainConfig: every field has one (`beam` as
    BeamConfig's --head and --threshold) with the field's default and documented help, so a command
    line with only what must be given trains exactly the API's default run."""
    import argparse
    import dataclasses

    from beam_moe.cli import build_parser
    from beam_moe.cli.train import config_from_args
    from beam_moe.config import BeamConfig
    from beam_moe.train import TrainConfig

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in subparsers.choices["train"]._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "beam":
            continue
        assert field.name in actions, f"TrainConfig.{field.name} has no beam-moe train option"
        if field.default is not dataclasses.MISSING:
            assert actions[field.name].default == field.default, field.name
        if "help" in field.metadata:
            assert actions[field.name].help.startswith(field.metadata["help"]), field.name
    beam = BeamConfig()
    assert (actions["head"].default, actions["threshold"].default) == (beam.head, beam.threshold)

    argv = ["train", "--model", "m", "--data", "d", "--output", "o", "--beta", "0.1"]
    cli = config_from_args(parser.parse_args(argv))
    api = TrainConfig(model="m", data=["d"], output="o", beta=0.1)
    assert {**cli.to_dict(), "beam": None} == {**api.to_dict(), "beam": None}
    assert cli.beam_config() == api.beam_config()
