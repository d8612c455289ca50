"""`beam-moe bench layer|generate|make-model`: speed against transformers and against the hardware floor."""

from __future__ import annotations

import argparse
import json

from beam_moe.cli._output import add_output_arguments

FILE_OUTPUT = {
    "metavar": "FILE",
    "required": False,
    "overwrite_help": "replace an existing --output file",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from beam_moe.presets import PRESETS

    parser = subparsers.add_parser("bench", help="speed benchmarks: one MoE layer, or generation")
    commands = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    layer = commands.add_parser(
        "layer",
        help="one MoE layer at a preset's real sizes: transformers at Top-K vs BEAM vs the floor",
        description="Random bf16 weights at the preset's real sizes, random routing, masks that keep "
        "exactly round(avg_k * T) pairs. Methods are interleaved call by call; medians over rotating draws.",
    )
    layer.add_argument(
        "--preset", required=True, help="a real model's MoE layer sizes: " + ", ".join(PRESETS)
    )
    layer.add_argument(
        "--tokens", default="1,8,64,512", help="comma-separated token counts (default 1,8,64,512)"
    )
    layer.add_argument("--avg-k", type=float, required=True, help="kept experts per token under the mask")
    layer.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    layer.add_argument("--dtype", default="bfloat16", help="weights and activations (default bfloat16)")
    layer.add_argument("--backend", default="auto", help="BEAM expert backend (default auto)")
    layer.add_argument(
        "--compare-backends", default=None, help="also time BEAM with these backends, e.g. grouped,triton"
    )
    layer.add_argument("--draws", type=int, default=8, help="random inputs and masks to rotate over")
    layer.add_argument("--rounds", type=int, default=30, help="timed calls per method, at most")
    layer.add_argument("--budget", type=float, default=30.0, help="seconds of timing per token count, about")
    layer.add_argument(
        "--max-gather-gb", type=float, default=2.0, help="skip batched_mm when it would gather more weights"
    )
    layer.add_argument("--seed", type=int, default=0)
    add_output_arguments(layer, "also write the JSON result to this file", **FILE_OUTPUT)
    layer.add_argument("--json", action="store_true", help="print JSON instead of a table")
    layer.set_defaults(func=run_layer)

    generate = commands.add_parser(
        "generate",
        help="a BEAM model against its base in transformers generate: TTFT, time per token, throughput",
    )
    generate.add_argument("adapter", help="a BEAM adapter folder (its base is loaded from the adapter)")
    generate.add_argument("--base", default=None, help="the base model folder, if the adapter's is elsewhere")
    generate.add_argument("--input-len", type=int, default=128)
    generate.add_argument("--output-len", type=int, default=32)
    generate.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    generate.add_argument("--repeats", type=int, default=3, help="generations per variant and batch size")
    generate.add_argument(
        "--base-impls", default="eager,grouped_mm", help="transformers experts implementations for the base"
    )
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    generate.add_argument("--dtype", default="bfloat16")
    generate.add_argument("--seed", type=int, default=0)
    add_output_arguments(generate, "also write the JSON result to this file", **FILE_OUTPUT)
    generate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    generate.set_defaults(func=run_generate)

    make = commands.add_parser(
        "make-model",
        help="write a real-size test model (random weights) and a BEAM adapter calibrated to an Avg-K",
    )
    add_output_arguments(make, "folder to create: DIR/base and DIR/adapter")
    make.add_argument("--preset", default="qwen3-30b-a3b")
    make.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    make.add_argument("--avg-k", type=float, default=1.23, help="target kept experts per token")
    make.add_argument("--dtype", default="bfloat16")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--json", action="store_true", help="print JSON instead of a table")
    make.set_defaults(func=run_make_model)


def _device(name: str | None):
    import torch

    from beam_moe.errors import BeamError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BeamError("--device cuda: no CUDA device is available here")
    return device


def _check_output(args: argparse.Namespace) -> None:
    from beam_moe.outputs import check_output_file

    check_output_file(args.output, overwrite=args.overwrite)


def _emit(document: dict, args: argparse.Namespace, table: list[str]) -> None:
    document = {"command": args.command_line, **document}
    text = json.dumps(document, indent=2)
    if args.output:
        from beam_moe.atomic import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        print("\n".join(table))


def run_layer(args: argparse.Namespace) -> int:
    from beam_moe.base_models import parse_dtype
    from beam_moe.bench.layer import bench_layer, parse_tokens
    from beam_moe.presets import get_preset

    _check_output(args)
    preset = get_preset(args.preset)
    tokens = parse_tokens(args.tokens)
    compare = [b for b in (args.compare_backends or "").split(",") if b]
    document = bench_layer(
        preset,
        tokens,
        args.avg_k,
        device=_device(args.device),
        dtype=parse_dtype(args.dtype),
        backend=args.backend,
        compare_backends=compare,
        draws=args.draws,
        rounds=args.rounds,
        budget_s=args.budget,
        max_gather_gb=args.max_gather_gb,
        seed=args.seed,
    )
    header = f"{'tokens':>6} {'kept':>5} {'hf (impl)':>20} {'keep-all':>9} {'beam':>9} {'floor':>9} {'speed-up':>9} {'ideal':>7} {'x floor':>8}"
    table = [f"{document['preset']}, Avg-K {document['avg_k']}, {document['device']} (times in ms)", header]
    for r in document["results"]:
        table.append(
            f"{r['tokens']:>6} {r['kept_pairs']:>5} {r['hf_topk_ms']:>9.3f} ({r['hf_impl']:>8}) "
            f"{r['beam_keepall_ms']:>9.3f} {r['beam_ms']:>9.3f} {r['floor_ms']:>9.3f} "
            f"{r['speedup_vs_hf']:>8.2f}x {r['ideal_speedup']:>6.2f}x {r['fraction_of_floor']:>7.2f}x"
        )
    _emit(document, args, table)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from beam_moe.base_models import parse_dtype
    from beam_moe.bench.generate import bench_generate
    from beam_moe.bench.layer import parse_tokens

    _check_output(args)
    document = bench_generate(
        args.adapter,
        base=args.base,
        input_len=args.input_len,
        output_len=args.output_len,
        batch_sizes=parse_tokens(args.batch_sizes),
        repeats=args.repeats,
        base_impls=[b for b in args.base_impls.split(",") if b],
        device=_device(args.device),
        dtype=parse_dtype(args.dtype),
        seed=args.seed,
    )
    table = [
        f"{document['adapter']}: input {document['input_len']}, output {document['output_len']}, {document['device']}",
        f"{'batch':>5} {'model':>16} {'TTFT ms':>9} {'per token ms':>13} {'tokens/s':>9}",
    ]
    for r in document["results"]:
        for name, m in r["models"].items():
            table.append(
                f"{r['batch_size']:>5} {name:>16} {m['ttft_ms']:>9.1f} {m['tpot_ms']:>13.2f} {m['throughput_tok_s']:>9.2f}"
            )
        table.append(
            f"{'':>5} {'speed-up':>16} {r['ttft_speedup']:>8.2f}x {r['tpot_speedup']:>12.2f}x {r['throughput_speedup']:>8.2f}x"
        )
    _emit(document, args, table)
    return 0


def run_make_model(args: argparse.Namespace) -> int:
    from beam_moe.base_models import parse_dtype
    from beam_moe.bench.synthetic import build_test_model

    summary = build_test_model(
        args.output,
        args.preset,
        num_layers=args.layers,
        avg_k=args.avg_k,
        dtype=parse_dtype(args.dtype),
        seed=args.seed,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:<16} {value}")
    return 0
