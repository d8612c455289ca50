import json

import pytest

from beam_moe import BeamConfig, BeamError


def test_defaults_match_the_paper():
    config = BeamConfig()
    assert config.threshold == 0.5
    assert config.init == "zeros"
    assert config.bias is False
    assert config.renormalize is False
    assert config.logit_threshold == 0.0


def test_json_round_trip():
    config = BeamConfig(
        threshold=0.3, init="normal", init_std=0.1, bias=True, renormalize=True, layers=[2, 0]
    )
    again = BeamConfig.from_json(config.to_json())
    assert again == config
    assert again.layers == [0, 2]
    assert json.loads(config.to_json())["threshold"] == 0.3


@pytest.mark.parametrize("threshold", [0, 1, -0.1, 1.5, float("nan"), "0.5", True])
def test_threshold_outside_open_interval_is_refused(threshold):
    with pytest.raises(BeamError, match="threshold"):
        BeamConfig(threshold=threshold)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("init", "ones", "init must be one of"),
        ("init_std", -1.0, "init_std"),
        ("bias", "yes", "bias must be true or false"),
        ("backend", "cuda-magic", "backend must be one of"),
        ("layers", [0, -1], "layers"),
    ],
)
def test_invalid_fields_are_refused(field, value, message):
    with pytest.raises(BeamError, match=message):
        BeamConfig(**{field: value})


def test_unknown_keys_and_bad_json_are_refused():
    with pytest.raises(BeamError, match="unknown BEAM config keys \\['treshold'\\]"):
        BeamConfig.from_dict({"treshold": 0.5})
    with pytest.raises(BeamError, match="not valid JSON"):
        BeamConfig.from_json("{threshold: 0.5")
    with pytest.raises(BeamError, match="must be a JSON object"):
        BeamConfig.from_json("[0.5]")
