"""`beam-moe info PATH`: what a model folder or an adapter folder holds, and whether BEAM supports it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="describe a model or a BEAM adapter folder")
    parser.add_argument("path", help="a transformers model folder or a BEAM adapter folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def describe(path: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from beam_moe.adapter import CONFIG_FILE, read_adapter_config
    from beam_moe.base_models import model_source
    from beam_moe.errors import BeamError
    from beam_moe.families import FAMILIES, family_for

    merged = _merged(Path(path))
    if merged is not None:
        return merged
    checkpoint = _checkpoint(Path(path))
    if checkpoint is not None:
        return checkpoint
    if (Path(path) / CONFIG_FILE).is_file():
        document = read_adapter_config(path)
        base = document["base"]
        return {
            "kind": "beam adapter",
            "path": path,
            "base_model": base.get("name_or_path"),
            "model_type": base["model_type"],
            "moe_blocks": len(base["moe_blocks"]),
            "num_experts": base["num_experts"],
            "top_k": base["top_k"],
            "config": document["config"].to_dict(),
            "budgets": _budgets(document, path),
            "extra": document.get("extra", {}),
        }
    if not Path(path).exists() and (path.startswith((".", "/")) or path.count("/") != 1):
        raise BeamError(f"{path} does not exist (expected a model folder, an adapter folder or a Hub id)")
    name, is_local = model_source(path)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=is_local)
    except (OSError, ValueError) as e:
        raise BeamError(f"{path} is neither a BEAM adapter nor a transformers model folder ({e})") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    info = {
        "kind": "model",
        "path": path,
        "model_type": config.model_type,
        "supported": config.model_type in FAMILIES,
    }
    if info["supported"]:
        family = family_for(model)
        blocks = family.find_blocks(model)
        router = family.router(blocks[0][1]) if blocks else None
        info.update(
            family=family.description,
            moe_blocks=len(blocks),
            num_experts=int(family.router_weight(router).shape[0]) if router is not None else None,
            top_k=int(router.top_k) if router is not None else None,
            shared_experts=bool(family.shared_expert_attrs),
        )
    else:
        info["supported_families"] = list(FAMILIES)
    return info


def _merged(path: Path) -> dict | None:
    """An exported checkpoint (`beam-moe export`): the base's files, the masks and a BEAM config.json."""
    from beam_moe.merged import FORMAT

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    export = config.get("beam_export") if isinstance(config, dict) else None
    if not isinstance(export, dict) or export.get("format") != FORMAT:
        return None
    from beam_moe.merged import read_merged_config

    export = read_merged_config(config, str(path / "config.json"))
    return {
        "kind": "merged BEAM checkpoint (written by beam-moe export)",
        "path": str(path),
        "load_with": f"beam_moe.from_pretrained({str(path)!r}), or vLLM with the beam-moe plugin",
        "exported_from": export.get("base_name_or_path"),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "mask_layers": export["mask_layers"],
        "config": config.get("beam") or export["config"],
        "budgets": _budgets(config, str(path)),
    }


def _budgets(document: dict, path: str) -> str:
    """Which budgets in experts (`beam_avg_k`) the checkpoint serves: its threshold curve's range."""
    from beam_moe.adapter import read_threshold_curve

    curve = read_threshold_curve(document)
    if curve is None:
        return f"thresholds only, no threshold curve (measure one: beam-moe calibrate {path} --data FILE)"
    low, high = curve.avg_k_range
    measured = curve.measured_on
    return (
        f"Avg-K {low:.3f} to {high:.3f} (threshold curve on {measured.get('tokens', '?')} tokens of "
        f"{measured.get('text', 'unrecorded text')})"
    )


def _checkpoint(path: Path) -> dict | None:
    """A training checkpoint (`RUN/checkpoints/step-N`): what it belongs to and what to do with it."""
    from beam_moe.train.checkpointing import checkpoint_step, run_of_checkpoint
    from beam_moe.train.output import read_run_config

    run = run_of_checkpoint(path)
    if run is None:
        return None
    config = read_run_config(run)
    return {
        "kind": "training checkpoint (written during beam-moe train)",
        "path": str(path),
        "run": str(run),
        "step": checkpoint_step(path),
        "base_model": config.model,
        "train": config.train,
        "target_avg_k": config.target_avg_k,
        "beta": config.beta,
        "evaluate": f"beam-moe eval {path}"
        if config.train in ("mask", "mask+router")
        else f"finish the run (--resume), then beam-moe eval {run}",
        "continue": f"the same beam-moe train command with --output {run} --resume",
    }


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
