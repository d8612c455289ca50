"""Training state without pickle: exact round trips through safetensors + JSON, and no pickle in the package."""

import io
import json
import math
import tokenize
from pathlib import Path

import pytest
import torch

import beam_moe
from beam_moe import BeamError
from beam_moe.statefile import load_state, save_state

PACKAGE = Path(beam_moe.__file__).parent


def adamw_after_steps(steps: int, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight], "weight_decay": 0.1}, {"params": list(model.parameters())[1:]}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_an_adamw_state_round_trips_exactly_and_resumes_bit_for_bit(tmp_path):
    model, optimizer = adamw_after_steps(3)
    state = optimizer.state_dict()
    save_state(tmp_path, "optimizer", state)
    loaded = load_state(tmp_path, "optimizer")
    assert_same(loaded, state)  # int keys, tuple betas, 0-d step tensors, None flags
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)

    # Continue from the files and from memory: the same next step, bit for bit.
    resumed_model, resumed = adamw_after_steps(0)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(loaded)
    batch = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (resumed_model, resumed)):
        m(batch).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_awkward_values_round_trip(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "tied": {"embed": shared, "lm_head": shared},  # shared memory: safetensors alone refuses it
        "view": shared[1:3],
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "floats": [float("nan"), float("inf"), -float("inf"), 0.1, -0.0],
        "__tensor__": "a key that looks like a tag",
        "nested": {1: (None, True, "x"), (2, "y"): [1, 2**70]},
        "names/with/slashes": {"a": torch.ones(1)},
        "names": {"with": {"slashes": {"a": torch.zeros(1)}}},
    }
    save_state(tmp_path, "s", state)
    assert_same(load_state(tmp_path, "s"), state)
    json.loads((tmp_path / "s.json").read_text())  # strict JSON: no NaN literals


def test_damaged_state_files_are_a_beam_error(tmp_path):
    save_state(tmp_path, "s", {"w": torch.ones(3), "step": 1})
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BeamError, match="cannot read"):
        load_state(tmp_path, "s")
    save_state(tmp_path, "s", {"w": torch.ones(3), "step": 1})
    (tmp_path / "s.json").write_text('{"w": {"__tensor__": "not-there"}}')
    with pytest.raises(BeamError, match="cannot read"):
        load_state(tmp_path, "s")
    with pytest.raises(BeamError, match="cannot read"):
        load_state(tmp_path, "missing")


UNPICKLING_NAMES = {"pickle", "_pickle", "cloudpickle", "dill", "joblib", "weights_only", "allow_pickle"}


def pickle_uses(source: str) -> list[tuple[int, str]]:
    """Code (not comments or docstrings) that reads or writes pickles: those names, or torch.load/save."""
    names = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME]
    found = [(t.start[0], t.string) for t in names if t.string in UNPICKLING_NAMES]
    for i, token in enumerate(names[:-1]):
        follower = names[i + 1]
        adjacent = follower.start == (token.end[0], token.end[1] + 1)  # `torch.load`: one dot apart
        if token.string == "torch" and follower.string in ("load", "save") and adjacent:
            found.append((token.start[0], f"torch.{follower.string}"))
    return found


def test_the_pickle_check_sees_code_and_not_prose():
    code = 'import pickle\nx = torch.load(f, weights_only=True)\n"""torch.load and pickle in prose"""\n# pickle\n'
    assert pickle_uses(code) == [(1, "pickle"), (2, "weights_only"), (2, "torch.load")]


def test_no_pickle_anywhere_in_the_package():
    """torch.load/torch.save and pickle run code from the file they read: the package must not use them."""
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, what in pickle_uses(path.read_text())
    ]
    assert not found, "\n".join(found)
