"""Arguments and output helpers that the evaluation commands (eval, analyze, sweep) share."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from beam_moe.atomic import atomic_write_text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model folder (overrides the one the adapter names)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-length", type=int, default=512, help="tokens per forward pass (window)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, help="use only the first N tokens of the text")
    parser.add_argument("--text-key", default="text", help="JSONL field that holds the text")


def add_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    from beam_moe.eval.baselines import BASELINES

    group = parser.add_argument_group("baselines (replace the mask heads)")
    group.add_argument("--baseline", help=f"route with a baseline instead of BEAM: {', '.join(BASELINES)}")
    group.add_argument("--param", type=float, help="the baseline's parameter (k, p, threshold or keep_prob)")
    group.add_argument("--target-avg-k", type=float, help="calibrate the baseline's parameter to this Avg-K")
    group.add_argument("--calibration-data", help="text for calibration (default: the evaluation text)")
    group.add_argument("--calibration-tokens", type=int, default=4096, help="tokens used for calibration")
    group.add_argument("--seed", type=int, default=0, help="seed of the random mask baseline")


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dump_json(document: dict[str, Any], path: str | None = None) -> str:
    text = json.dumps(json_safe(document), indent=2) + "\n"
    if path:
        atomic_write_text(path, text)
    return text


def check_baseline_arguments(args: argparse.Namespace) -> None:
    """Refuse inconsistent baseline options before any model is loaded."""
    from beam_moe.errors import BeamError
    from beam_moe.eval.baselines import get_baseline

    if args.baseline is None:
        if args.param is not None or args.target_avg_k is not None:
            raise BeamError("--param and --target-avg-k need --baseline NAME")
        return
    spec = get_baseline(args.baseline)
    if (args.param is None) == (args.target_avg_k is None):
        raise BeamError(
            f"--baseline {args.baseline} needs exactly one of --param {spec.param.upper()} or --target-avg-k X"
        )
    if args.param is not None and spec.high is not None:
        spec.check(args.param, top_k=0)


def apply_routing(args: argparse.Namespace, model, tokenizer, data) -> dict[str, Any]:
    """Route `model` as the arguments ask (its mask heads, or a baseline, calibrated when asked)."""
    from beam_moe.eval.baselines import apply_baseline, get_baseline
    from beam_moe.eval.calibrate import calibrate

    if args.baseline is None:
        return {"method": "beam"}
    spec = get_baseline(args.baseline)
    value, calibration = args.param, None
    if args.target_avg_k is not None:
        found = calibrate(
            model,
            tokenizer,
            args.baseline,
            args.target_avg_k,
            args.calibration_data or data,
            max_tokens=args.calibration_tokens,
            max_length=args.max_length,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        value, calibration = found.param, found.to_dict()
    apply_baseline(model, args.baseline, value, seed=args.seed)
    return {"method": args.baseline, "param_name": spec.param, "param": value, "calibration": calibration}
