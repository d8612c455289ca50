import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from beam_moe.tiny_models import TINY_CONFIGS  # noqa: E402

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine it costs seconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def _cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Markers by place and need: everything under integration/ is `slow`; `gpu` tests run only on a
    CUDA device and `cpu_only` ones only without one, so no test asks `torch.cuda` itself."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not _cuda():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("cpu_only") and _cuda():
            item.add_marker(pytest.mark.skip(reason="about the CPU; a CUDA device is present"))
