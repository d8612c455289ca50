"""Bad input, fuzzed: damaged adapters, broken training data, odd serve-time overrides.

Every case must end in a BeamError (the library's own clear error) or in a correct result, never
in another exception, and a writer must leave its output folder complete or absent. Each bug the
fuzzing found is kept as an `@example`.
"""

import atexit
import contextlib
import functools
import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from beam_moe import BeamConfig, BeamError, attach, detach, is_attached, load_beam, read_adapter_config
from beam_moe.adapter import CONFIG_FILE, WEIGHTS_FILE, save_beam
from beam_moe.base_models import load_base_model
from beam_moe.cli.info import describe
from beam_moe.config import BACKENDS
from beam_moe.merged import RUNTIME_KEYS, effective_beam_config, export_merged, read_merged_config
from beam_moe.tiny_models import CHAT_TEMPLATE, byte_tokenizer, save_tiny
from beam_moe.train.data import IGNORE, tokenize_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**80)
    | st.integers(min_value=10**308, max_value=10**400)  # past float's range
    | st.floats()
    | st.sampled_from([0, 1, -1, 0.5, 1.5, -0.5, 1e308, "", "auto", "zeros", "normal", "F32", "I8", []])
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


# Edits: plain data, so that a regression case can be written down as an @example ---------------


def places(value, path=()):
    """Every path into a JSON document, the root first."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from places(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from places(child, (*path, index))


@st.composite
def json_edits(draw, document):
    """("replace", path, value) | ("delete", path) | ("add", path, key, value) on `document`."""
    path = draw(st.sampled_from(list(places(document))))
    target = document
    for key in path:
        target = target[key]
    action = draw(st.sampled_from(["replace", "delete", "add"] if path else ["replace", "add"]))
    if action == "add" and isinstance(target, dict):
        return ("add", path, draw(st.text(max_size=8)), draw(json_values))
    if action == "delete":
        return ("delete", path)
    return ("replace", path, draw(json_values))


def apply_edit(document, edit):
    action, path = edit[0], edit[1]
    if action == "replace" and not path:
        return edit[2]
    parent = document
    for key in path[:-1] if action != "add" else path:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "add":
        if isinstance(parent, dict):
            parent[edit[2]] = edit[3]
    else:
        parent[path[-1]] = edit[2]
    return document


def byte_damage(size: int, header: int = 0):
    """("truncate", n) | ("flip", [(position, bit)...]) | ("splice", at, bytes) | ("overwrite", at, bytes);
    `header` (its length in bytes) makes damage there likelier."""
    positions = st.integers(0, size - 1) | (st.integers(0, header - 1) if header else st.nothing())
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(positions, st.integers(0, 7)), min_size=1, max_size=4)),
        st.tuples(st.just("splice"), st.integers(0, size), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=8)),
    )


def apply_damage(raw: bytes, damage) -> bytes:
    if damage[0] == "truncate":
        return raw[: damage[1]]
    if damage[0] == "flip":
        out = bytearray(raw)
        for position, bit in damage[1]:
            out[position % len(out)] ^= 1 << bit
        return bytes(out)
    if damage[0] == "overwrite":
        return (raw[: damage[1]] + damage[2] + raw[damage[1] + len(damage[2]) :])[: len(raw)]
    return raw[: damage[1]] + damage[2] + raw[damage[1] :]


# Adapters -------------------------------------------------------------------------------------


@functools.cache
def template() -> Path:
    """A real adapter (mask weights and biases) on a real tiny base, written once per session."""
    root = Path(tempfile.mkdtemp(prefix="beam-fuzz-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    save_tiny("qwen3_moe", root / "base")
    model = attach(load_base_model(root / "base"), BeamConfig(init="normal", bias=True))
    save_beam(model, root / "adapter", extra={"note": "fuzz"})
    return root


def template_config() -> dict:
    return json.loads((template() / "adapter" / CONFIG_FILE).read_text())


def template_weights() -> bytes:
    return (template() / "adapter" / WEIGHTS_FILE).read_bytes()


def header_size(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


@functools.cache
def base_model():
    """The adapter's base, loaded once; every case leaves it without BEAM attached."""
    return load_base_model(template() / "base")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Makes a fresh copy of the adapter per example (hypothesis runs many inside one test call)."""
    root = tmp_path_factory.mktemp("fuzz")

    def make() -> Path:
        folder = Path(tempfile.mkdtemp(dir=root))
        shutil.copytree(template() / "adapter", folder / "adapter")
        return folder / "adapter"

    return make


def loads_or_refuses(model, folder: Path) -> bool:
    """load_beam succeeds or raises a BeamError that leaves the model as it was; nothing else."""
    try:
        load_beam(model, folder)
    except BeamError as e:
        assert str(e)
        assert not is_attached(model), "a refused adapter must leave the model untouched"
        return False
    detach(model)
    return True


config_damage = st.one_of(
    st.deferred(lambda: json_edits(template_config())).map(lambda edit: ("json", edit)),
    st.deferred(lambda: byte_damage(len(json.dumps(template_config())))).map(lambda d: ("bytes", d)),
)


@fuzz(120)
@given(damage=config_damage)
@example(damage=("bytes", ("splice", 0, b"\x80")))  # not UTF-8: was a UnicodeDecodeError
@example(damage=("bytes", ("splice", 0, b"[" * 100_000)))  # nested past the recursion limit
@example(damage=("json", ("replace", ("base", "moe_blocks"), None)))  # was a TypeError in the identity check
@example(damage=("json", ("replace", ("base", "moe_blocks", 0), None)))
@example(damage=("json", ("replace", ("base", "router_fingerprint", 0), None)))
@example(damage=("json", ("replace", ("base", "router_fingerprint", 0, 1), None)))
@example(damage=("json", ("replace", ("base", "router_fingerprint", 0, 2), 10**400)))  # OverflowError
def test_a_damaged_adapter_config_is_refused_clearly(scratch, damage):
    folder = scratch()
    text = (folder / CONFIG_FILE).read_text()
    if damage[0] == "json":
        raw = json.dumps(apply_edit(json.loads(text), damage[1])).encode("utf-8", "surrogatepass")
    else:
        raw = apply_damage(text.encode(), damage[1])
    (folder / CONFIG_FILE).write_bytes(raw)
    for read in (read_adapter_config, lambda path: describe(str(path))):  # describe: `beam-moe info`
        with contextlib.suppress(BeamError):
            read(folder)
    loads_or_refuses(base_model(), folder)


header_damage = st.deferred(
    lambda: json_edits(json.loads(template_weights()[8 : header_size(template_weights())]))
).map(lambda edit: ("header", edit))
weights_damage = header_damage | st.deferred(
    lambda: byte_damage(len(template_weights()), header_size(template_weights()))
).map(lambda d: ("bytes", d))


def rewrite_header(raw: bytes, edit) -> bytes:
    header = apply_edit(json.loads(raw[8 : header_size(raw)]), edit)
    text = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text)) + text + raw[header_size(raw) :]


BIAS_0 = "model.layers.0.mlp.beam_mask.bias"


@fuzz(120)
@given(damage=weights_damage, fix_sha=st.booleans())
@example(damage=("header", ("replace", (BIAS_0, "dtype"), "I32")), fix_sha=True)  # was loaded as numbers
@example(damage=("bytes", ("overwrite", 424, b"\x00\x00\xc0\x7f")), fix_sha=True)  # a NaN: was loaded
def test_damaged_adapter_weights_are_refused_clearly(scratch, damage, fix_sha):
    """With fix_sha the config's SHA-256 matches the damaged file, so the safetensors parser and
    the tensor checks see the damage instead of the checksum."""
    folder = scratch()
    raw = (folder / WEIGHTS_FILE).read_bytes()
    raw = rewrite_header(raw, damage[1]) if damage[0] == "header" else apply_damage(raw, damage[1])
    (folder / WEIGHTS_FILE).write_bytes(raw)
    if fix_sha:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["weights"]["sha256"] = hashlib.sha256(raw).hexdigest()
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    model = base_model()
    try:
        load_beam(model, folder)
    except BeamError as e:
        assert not is_attached(model), "a refused adapter must leave the model untouched"
        if not fix_sha and raw != template_weights():
            assert "SHA-256" in str(e)
        return
    detach(model)
    # What was accepted is a usable adapter: floating-point mask heads with finite values.
    for name, tensor in load_file(folder / WEIGHTS_FILE).items():
        assert tensor.dtype.is_floating_point and bool(torch.isfinite(tensor.float()).all()), name


@fuzz(40)
@given(
    extra=json_values | st.builds(set) | st.builds(object) | st.just({"t": torch.ones(1)}),
    target=st.sampled_from(["new folder", "an adapter", "a file"]),
)
@example(extra=set(), target="new folder")  # was a TypeError from json.dumps
@example(extra={(1, 2): "a tuple key"}, target="an adapter")
@example(extra={}, target="a file")  # was a NotADirectoryError
def test_save_beam_writes_a_complete_adapter_or_nothing(scratch, extra, target):
    """A refused save leaves the target as it was: absent, the old adapter, or the file."""
    existing = scratch()
    folder = {"new folder": existing.parent / "new", "an adapter": existing, "a file": existing / CONFIG_FILE}
    folder = folder[target]
    before = folder.read_bytes() if folder.is_file() else None
    model = attach(base_model())
    try:
        save_beam(model, folder, extra=extra if isinstance(extra, dict) else {"value": extra})
    except BeamError as e:
        assert str(e)
        assert folder.exists() == (target != "new folder")
        assert before is None or folder.read_bytes() == before
        if target == "an adapter":
            assert read_adapter_config(folder)["extra"] == {"note": "fuzz"}
    else:
        assert read_adapter_config(folder)["extra"] is not None
    finally:
        detach(model)
    if folder.is_dir():
        assert loads_or_refuses(base_model(), folder)


@fuzz(30)
@given(damage=config_damage | weights_damage)
def test_export_of_a_damaged_adapter_writes_a_complete_folder_or_nothing(scratch, damage):
    folder = scratch()
    if damage[0] == "json":
        text = json.dumps(apply_edit(json.loads((folder / CONFIG_FILE).read_text()), damage[1]))
        (folder / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogatepass"))
    else:
        raw = (folder / WEIGHTS_FILE).read_bytes()
        raw = rewrite_header(raw, damage[1]) if damage[0] == "header" else apply_damage(raw, damage[1])
        (folder / WEIGHTS_FILE).write_bytes(raw)
    output = folder.parent / "merged"
    try:
        export_merged(folder, output, model=template() / "base")
    except BeamError:
        assert not output.exists(), "a refused export must leave no folder behind"
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".merged")], "staging left over"
        return
    assert read_merged_config(json.loads((output / "config.json").read_text()))
    assert {CONFIG_FILE, WEIGHTS_FILE, "model.safetensors", "tokenizer.json"} <= {
        p.name for p in output.iterdir()
    }


# Training data --------------------------------------------------------------------------------

odd_text = st.text(
    alphabet=st.characters(exclude_categories=()),  # lone surrogates, controls, NUL, RTL, emoji...
    max_size=40,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "", "ASSISTANT"]) | st.text(max_size=5)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": roles, "content": odd_text}),
        st.fixed_dictionaries({"role": roles}, optional={"content": json_values, "extra": json_values}),
        st.fixed_dictionaries({"content": odd_text}),
        json_values,
    ),
    max_size=4,
)
records = st.one_of(
    st.fixed_dictionaries({"text": odd_text}),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"text": json_values}, optional={"messages": json_values}),
    json_values,
)


@st.composite
def data_lines(draw) -> bytes:
    """One line of a JSONL file: a record (maybe broken), or raw bytes."""
    line = json.dumps(draw(records), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    kind = draw(st.sampled_from(["as is", "as is", "damaged", "raw"]))
    if kind == "damaged":
        return apply_damage(line, draw(byte_damage(max(1, len(line)))))
    if kind == "raw":
        return draw(st.binary(max_size=30))
    return line


STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
)


@functools.cache
def tokenizer(kind: str):
    """The byte tokenizer with its chat template: with {% generation %} markers, without them
    (assistant spans found by rendering prefixes), or strict about roles as real templates are."""
    tok = byte_tokenizer()
    if kind == "plain":
        tok.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    elif kind == "strict":
        tok.chat_template = STRICT_TEMPLATE
    return tok


@fuzz(150)
@given(
    lines=st.lists(data_lines(), min_size=1, max_size=5),
    suffix=st.sampled_from([".jsonl", ".jsonl", ".txt"]),
    kind=st.sampled_from(["marked", "plain", "strict"]),
    max_length=st.integers(1, 48),
    packing=st.booleans(),
)
@example(lines=[b'{"messages": []}'], suffix=".jsonl", kind="marked", max_length=8, packing=True)
@example(lines=[b"\xff"], suffix=".jsonl", kind="marked", max_length=8, packing=True)  # UnicodeDecodeError
@example(lines=[b"\xff"], suffix=".txt", kind="marked", max_length=8, packing=True)
@example(lines=[b"[" * 100_000], suffix=".jsonl", kind="marked", max_length=8, packing=True)
@example(lines=[b'{"text": "\\ud800"}'], suffix=".jsonl", kind="marked", max_length=8, packing=True)
@example(
    lines=[b'{"messages": [{"role": "tool", "content": "x"}]}'],
    suffix=".jsonl",
    kind="strict",
    max_length=8,
    packing=True,
)
@example(
    lines=[b'{"text": "' + b"x" * 200_000 + b'"}'],
    suffix=".jsonl",
    kind="marked",
    max_length=48,
    packing=True,
)  # huge: fine
def test_training_data_parses_or_is_refused_clearly(
    tmp_path_factory, lines, suffix, kind, max_length, packing
):
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / f"data{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        blocks = tokenize_blocks([str(path)], tokenizer(kind), max_length, packing)
    except BeamError as e:
        assert str(e)
        return
    assert blocks.input_ids.shape == blocks.labels.shape == blocks.attention_mask.shape
    assert blocks.input_ids.shape[1] == max_length and blocks.loss_tokens > 0
    assert bool(((blocks.labels == IGNORE) | (blocks.labels == blocks.input_ids)).all())


# Serve-time overrides -------------------------------------------------------------------------

EXPORTED = BeamConfig(threshold=0.55).to_dict()
MERGED_CONFIG = {
    "model_type": "qwen3_moe",
    "beam": dict(EXPORTED),
    "beam_export": {
        "format": "beam-moe-merged",
        "format_version": 1,
        "config": dict(EXPORTED),
        "base_architectures": ["Qwen3MoeForCausalLM"],
        "mask_layers": [0, 1],
    },
}
beam_keys = st.sampled_from([*EXPORTED, "threshold", "threshold", "unknown", ""]) | st.text(max_size=6)
beam_dicts = st.dictionaries(beam_keys, json_values | st.floats(0, 1) | st.booleans(), max_size=4)


@fuzz(150)
@given(
    beam=beam_dicts | json_values,
    overrides=st.none() | beam_dicts | json_values,
    export_edit=st.none() | json_edits(MERGED_CONFIG["beam_export"]),
)
@example(beam={}, overrides=1, export_edit=None)  # was a TypeError from **overrides
@example(beam={"threshold": 10**400}, overrides=None, export_edit=None)  # was an OverflowError in BeamConfig
@example(beam={}, overrides={"threshold": float("nan")}, export_edit=None)  # refused before too: a boundary
@example(beam={}, overrides=None, export_edit=("delete", ("config",)))  # was a KeyError
def test_serve_time_overrides_give_a_valid_config_or_a_clear_error(beam, overrides, export_edit):
    config = json.loads(json.dumps(MERGED_CONFIG))
    config["beam"] = beam
    if export_edit is not None:
        config["beam_export"] = apply_edit(config["beam_export"], export_edit)
    try:
        result = effective_beam_config(config, overrides, source="config.json")
    except BeamError as e:
        assert str(e)
        return
    assert isinstance(result.threshold, float) and 0 < result.threshold < 1
    assert isinstance(result.renormalize, bool) and result.backend in BACKENDS
    exported = BeamConfig.from_dict(config["beam_export"]["config"]).to_dict()
    fixed = {k: v for k, v in result.to_dict().items() if k not in RUNTIME_KEYS}
    assert fixed == {k: v for k, v in exported.items() if k not in RUNTIME_KEYS}
    assert BeamConfig.from_dict(result.to_dict()) == result
