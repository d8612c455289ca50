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

    from beam_moe.adapters import FAMILIES, family_for
    from beam_moe.checkpoint import CONFIG_FILE, read_adapter_config
    from beam_moe.errors import BeamError

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
            "extra": document.get("extra", {}),
        }
    if not Path(path).exists() and (path.startswith((".", "/")) or path.count("/") != 1):
        raise BeamError(f"{path} does not exist (expected a model folder, an adapter folder or a Hub id)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=Path(path).exists())
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


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
