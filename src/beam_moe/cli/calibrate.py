"""`beam-moe calibrate ADAPTER_OR_MERGED --data FILE`: measure the threshold -> Avg-K curve and store it.

The curve lets one adapter serve many budgets: a request's `beam_avg_k` (vLLM) or
`beam_budget(model, avg_k=...)` (transformers) is mapped to a threshold through it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from beam_moe.cli._evaluation import add_model_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    from beam_moe.eval.curve import DEFAULT_CURVE_TOKENS

    parser = subparsers.add_parser(
        "calibrate",
        help="measure an adapter's threshold -> Avg-K curve and store it, for per-request budgets",
        description="Run the adapter (on its base) or the merged checkpoint over the text once per "
        "threshold of a grid, measure Avg-K at each, and store the curve in place: in the adapter's "
        "beam_config.json, or in a merged checkpoint's config.json (beam_export.threshold_curve, what "
        "vLLM reads) and its beam_config.json. Requests can then ask for a budget in experts "
        "(beam_avg_k) within the measured range.",
    )
    parser.add_argument(
        "path", metavar="ADAPTER_OR_MERGED", help="a BEAM adapter folder or a merged checkpoint folder"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="text to measure on, like what will be served: .jsonl (field --text-key) or .txt",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_CURVE_TOKENS,
        help="use only the first N tokens of the text (each threshold runs over them once)",
    )
    parser.add_argument(
        "--thresholds",
        nargs="+",
        type=float,
        metavar="T",
        help="the grid, increasing, in (0, 1) (default: 33 thresholds, logit -8 to 8 in steps of 0.5)",
    )
    parser.add_argument("--max-length", type=int, default=512, help="tokens per forward pass (window)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--text-key", default="text", help="JSONL field that holds the text")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, "adapter" | "merged") for the folder, refused unless it holds mask heads."""
    from beam_moe.adapter import CONFIG_FILE
    from beam_moe.base_models import load_tokenizer
    from beam_moe.errors import BeamError
    from beam_moe.loading import load_eval_model
    from beam_moe.merged import from_pretrained, is_merged_checkpoint

    path = Path(args.path)
    if not path.is_dir():
        raise BeamError(
            f"{path} {'is not a folder' if path.exists() else 'does not exist'} "
            f"(expected a BEAM adapter folder or a merged checkpoint folder)"
        )
    if is_merged_checkpoint(path):
        if args.model is not None:
            raise BeamError(
                f"{path} is a merged checkpoint (it holds its base); --model applies to adapters only"
            )
        return from_pretrained(path, dtype=args.dtype, device=args.device), load_tokenizer(path), "merged"
    if not (path / CONFIG_FILE).is_file():
        raise BeamError(
            f"no BEAM adapter at {path} ({CONFIG_FILE} is missing): calibrate measures the mask heads of "
            "an adapter (what beam-moe train writes when it finishes) or of a merged checkpoint "
            "(beam-moe export)"
        )
    model, tokenizer, _ = load_eval_model(path, args.model, args.dtype, args.device)
    return model, tokenizer, "adapter"


def run(args: argparse.Namespace) -> int:
    from beam_moe.adapter import CONFIG_FILE, write_threshold_curve
    from beam_moe.attach import get_attachment
    from beam_moe.errors import BeamError
    from beam_moe.eval.curve import check_thresholds, measure_threshold_curve
    from beam_moe.eval.text import read_texts
    from beam_moe.merged import write_merged_threshold_curve
    from beam_moe.threshold_curve import DEFAULT_THRESHOLDS

    thresholds = DEFAULT_THRESHOLDS if args.thresholds is None else args.thresholds
    try:
        check_thresholds(thresholds)
    except BeamError as e:
        raise BeamError(f"--{e}") from None
    if args.max_tokens < 2:
        raise BeamError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    read_texts(args.data, text_key=args.text_key)  # a missing or empty file fails before the model loads
    model, tokenizer, kind = _load(args)
    curve = measure_threshold_curve(
        model,
        tokenizer,
        args.data,
        thresholds=thresholds,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        text_key=args.text_key,
        progress=not args.json,
    )
    path = Path(args.path)
    if kind == "merged":
        write_merged_threshold_curve(path, curve)
        stored = [str(path / "config.json"), str(path / CONFIG_FILE)]
    else:
        write_threshold_curve(path, curve)
        stored = [str(path / CONFIG_FILE)]
    own = get_attachment(model).config.threshold
    low, high = curve.avg_k_range
    document = {
        "path": str(path),
        "kind": kind,
        "stored_in": stored,
        "avg_k_range": [low, high],
        "threshold": own,
        "avg_k_at_threshold": curve.avg_k_at(own),
        "threshold_curve": curve.to_dict(),
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"{'threshold':>10}  Avg-K")
    for threshold, avg_k in zip(curve.thresholds, curve.avg_k, strict=True):
        print(f"{threshold:>10.4g}  {avg_k:.3f}")
    print(
        f"Avg-K range {low:.3f} to {high:.3f} of Top-K {curve.top_k}, measured on "
        f"{curve.measured_on['tokens']} tokens of {curve.measured_on['text']}"
    )
    print(f"at the checkpoint's own threshold {own:g}: Avg-K {document['avg_k_at_threshold']:.3f}")
    print(f"stored in {', '.join(stored)}")
    return 0
