"""`beam-moe eval O --ppl FILE [--tasks ...]`: perplexity, Avg-K, MoE-layer FLOPs, lm-eval tasks, baselines."""

from __future__ import annotations

import argparse
from typing import Any

from beam_moe.cli._evaluation import (
    add_baseline_arguments,
    add_model_arguments,
    add_text_arguments,
    apply_routing,
    check_baseline_arguments,
    dump_json,
)
from beam_moe.cli._output import add_output_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity, Avg-K and MoE-layer FLOPs of a BEAM adapter (or a baseline); lm-eval tasks",
        description="Evaluate a BEAM adapter folder (or a model folder: fresh heads keep every expert, so "
        "it evaluates as the base model). Without --ppl and --tasks, perplexity runs on the shipped "
        "held-out Wikipedia text.",
    )
    parser.add_argument("path", metavar="O", help="BEAM adapter folder, or a transformers model folder")
    parser.add_argument("--ppl", metavar="FILE", help="text for perplexity: .jsonl (field 'text') or .txt")
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="lm-eval tasks, space- or comma-separated (shipped: beam_wiki_ppl beam_wiki_cloze)",
    )
    parser.add_argument("--include-path", action="append", default=[], help="extra lm-eval task folder")
    parser.add_argument("--limit", type=float, help="lm-eval: documents per task (or a fraction)")
    parser.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples")
    add_model_arguments(parser)
    add_text_arguments(parser)
    add_baseline_arguments(parser)
    parser.add_argument(
        "--no-base",
        action="store_true",
        help="skip the base model's perplexity (with every Top-K expert) shown beside the adapter's; "
        "it costs one more pass over the text",
    )
    add_output_arguments(
        parser,
        "also write the JSON result to this file",
        metavar="FILE",
        required=False,
        overwrite_help="replace an existing --output file",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from beam_moe.attach import disable_masks, set_routing_policy
    from beam_moe.errors import require
    from beam_moe.eval import DEFAULT_PPL_FILE, measured_flops, perplexity, read_texts, run_tasks
    from beam_moe.loading import load_eval_model
    from beam_moe.outputs import check_output_file
    from beam_moe.routing import keep_all

    check_output_file(args.output, overwrite=args.overwrite)
    if args.tasks:
        require("lm_eval", "eval", "--tasks")  # before the model loads, not after
    check_baseline_arguments(args)
    ppl_file = args.ppl or (None if args.tasks else str(DEFAULT_PPL_FILE))
    if ppl_file is not None:
        read_texts(ppl_file, text_key=args.text_key)  # a missing or empty file fails before the model loads
    model, tokenizer, loaded = load_eval_model(args.path, args.model, args.dtype, args.device)
    warn_long_windows(args.max_length, model.config)
    plain_base = loaded["adapter"] is None and args.baseline is None

    def measure():
        return perplexity(
            model,
            tokenizer,
            ppl_file,
            max_length=args.max_length,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            text_key=args.text_key,
            progress=not args.json,
        )

    document: dict[str, Any] = dict(loaded)
    if ppl_file is not None and not plain_base and not args.no_base:
        with disable_masks(model):  # the base model side by side, before any baseline is applied
            base = measure()
        document["base_perplexity"] = {
            "ppl": base.ppl,
            "nll": base.nll,
            "scored_tokens": base.scored_tokens,
            "routing": "every Top-K expert (masks off)",
        }
    if plain_base:
        set_routing_policy(model, keep_all)  # the base model's own routing: no mask head runs
        routing: dict[str, Any] = {"method": "base"}
    else:
        routing = apply_routing(args, model, tokenizer, ppl_file or str(DEFAULT_PPL_FILE))
    mask_head = routing["method"] == "beam"
    document["routing"] = routing
    per_layer = None
    if ppl_file is not None:
        result = measure()
        document["perplexity"] = {"file": ppl_file, **result.to_dict()}
        per_layer = result.per_layer
        if "base_perplexity" in document:
            document["ppl_change_vs_base"] = result.ppl / document["base_perplexity"]["ppl"] - 1.0
    if args.tasks:
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        harness = run_tasks(
            model,
            tokenizer,
            [task for arg in args.tasks for task in arg.split(",") if task],
            include_path=args.include_path,
            limit=limit,
            num_fewshot=args.num_fewshot,
        )
        document["lm_eval"] = harness
        per_layer = per_layer or harness["per_layer"]
    flops = measured_flops(model, per_layer, mask_head=mask_head)
    document["avg_k"] = flops["avg_k"]
    document["flops"] = flops
    text = dump_json(document, args.output)
    print(text if args.json else table(document), end="" if args.json else "\n")
    return 0


def warn_long_windows(max_length: int, model_config: Any) -> None:
    """Warn (a BeamWarning, which the CLI prints on stderr) when the windows are longer than the
    model's context.

    Evaluation warns where training refuses: a perplexity past the context is still what the
    model does there (length extrapolation is a fair question to ask), it just does not compare
    with numbers measured inside it, and a warning costs the user nothing to ignore.
    """
    import warnings

    from beam_moe.base_models import context_length
    from beam_moe.errors import BeamWarning

    limit = context_length(model_config)
    if limit is not None and max_length > limit:
        warnings.warn(
            f"--max-length {max_length} is longer than the model's context "
            f"({limit} tokens, max_position_embeddings): tokens past it are scored at positions the "
            f"model was not trained for; pass --max-length {limit} for a perplexity within its context",
            BeamWarning,
            stacklevel=2,
        )


def experts_ran(backends: dict[str, dict[str, int]]) -> str:
    """Which expert backends computed the layers: one name when every layer ran one backend
    (`grouped`), else each backend's share of the layer calls (`triton 75%, grouped 25%`)."""
    calls: dict[str, int] = {}
    for layer in backends.values():
        for name, count in layer.items():
            calls[name] = calls.get(name, 0) + count
    if len(calls) == 1:
        return f"run by {next(iter(calls))} in every layer"
    total = sum(calls.values())
    shares = sorted(calls.items(), key=lambda item: -item[1])
    return (
        "run by " + ", ".join(f"{name} {count / total:.0%}" for name, count in shares) + " of the layer calls"
    )


def table(document: dict[str, Any]) -> str:
    routing = document["routing"]
    method = routing["method"]
    if method == "base":
        how = "the base model's own (every Top-K expert)"
    elif method == "beam":
        how = "BEAM mask heads" + (" (training checkpoint)" if document.get("checkpoint_of") else "")
    else:
        how = f"{method} {routing['param_name']}={routing['param']:g}"
    flops = document["flops"]
    name = document["adapter"] or document["base_model"]
    lines = [
        f"model       {name}" + ("" if method == "base" else f"  (base: {document['base_model']})"),
        f"routing     {how}",
        f"Avg-K       {flops['avg_k']:.3f} of Top-K {flops['top_k']}",
    ]
    if "perplexity" in document:
        p = document["perplexity"]
        lines.append(f"perplexity  {p['ppl']:.4f}  ({p['scored_tokens']} tokens of {p['file']})")
        if "base_perplexity" in document:
            who = "BEAM" if method == "beam" else method
            lines.append(
                f"base        {document['base_perplexity']['ppl']:.4f}  (every Top-K expert, the same tokens): "
                f"{who} {document['ppl_change_vs_base']:+.2%}"
            )
        lines.append("per layer   " + " ".join(f"{k:.2f}" for k in p["per_layer"].values()))
        if p.get("zero_kept") and method != "base":
            lines.append("no expert   " + " ".join(f"{z:.1%}" for z in p["zero_kept"].values()))
        if p.get("backends") and method != "base":
            lines.append(f"experts     {experts_ran(p['backends'])}")
    if method == "base":
        lines.append(f"MoE FLOPs   {flops['base']['total'] / 1e6:.3f} MFLOPs/token (the base model's)")
    else:
        lines.append(
            f"MoE FLOPs   {flops['masked']['total'] / 1e6:.3f} of {flops['base']['total'] / 1e6:.3f} "
            f"MFLOPs/token: {flops['moe_flops_reduction']:.1%} saved (at most {flops['max_reduction']:.1%})"
        )
    for task, metrics in document.get("lm_eval", {}).get("results", {}).items():
        shown = ", ".join(
            f"{k.split(',')[0]} {v:.4g}"
            for k, v in metrics.items()
            if isinstance(v, float) and "stderr" not in k
        )
        lines.append(f"{task:<11} {shown}")
    return "\n".join(lines)
