"""Config validation, presets and the JSON/YAML round trip."""

import json

import pytest

from modelopt_lite.config import (PRESETS, ConfigError, QuantConfig, QuantizerSpec, get_preset,
                                  resolve_config)


@pytest.mark.parametrize("name", ["int8_weight_only", "int4_weight_only", "w8a8"])
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["version"] == 1


def test_every_registered_preset_round_trips():
    resolve_config("int8_weight_only")  # loads the built-in algorithm modules
    for name, cfg in PRESETS.items():
        assert QuantConfig.from_dict(json.loads(cfg.to_json())) == cfg, name


def test_yaml_and_json_files(tmp_path):
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=64),
                      exclude=("*lm_head*",))
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert resolve_config(str(tmp_path / "c.json")) == cfg
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert resolve_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("bad,match", [
    ({"weight": {"num_bits": 3}}, "num_bits=3 is not allowed"),
    ({"weight": {"granularity": "per_block"}}, "block_size goes with"),
    ({"weight": {"num_bits": 4, "block_size": 64}}, "block_size goes with"),
    ({"weigth": {}}, r"unknown QuantConfig key\(s\) \['weigth'\]"),
    ({"weight": {"bits": 4}}, r"unknown QuantizerSpec key\(s\) \['bits'\]"),
    ({"weight": None, "input": None}, "needs a weight or an input"),
    ({"input": {"granularity": "per_channel"}}, "activations are quantized per_tensor"),
    ({"input": {"granularity": "per_tensor", "symmetric": False}}, "symmetric"),
    ({"weight": {"dynamic": True}}, "statically"),
    ({"weight": {"num_bits": 4, "integer_zero": True}}, "set symmetric=False"),
    ({"on_indivisible": "pad"}, "choose one of"),
    ({"algorithm": {"name": "nope"}}, "unknown algorithm 'nope'"),
    ({"version": 99}, "newer than this modelopt_lite"),
])
def test_validation_rejects_with_a_message_that_says_what_is_allowed(bad, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig.from_dict(bad)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available presets: .*int8_weight_only"):
        resolve_config("int3_magic")


def test_configs_are_frozen():
    cfg = get_preset("w8a8")
    with pytest.raises(Exception):
        cfg.on_indivisible = "error"
    assert cfg.replace(on_indivisible="error").on_indivisible == "error"


def test_parse_overrides_types_values_like_the_defaults():
    from modelopt_lite.algorithms.awq import AWQConfig
    from modelopt_lite.algorithms.smoothquant import SmoothQuantConfig
    from modelopt_lite.config import ConfigError, parse_overrides

    got = parse_overrides(AWQConfig, ["search_tokens=8192", "gqa_v_o=true", "device=cuda",
                                      "clip_min_ratio=0.4"])
    assert got == {"search_tokens": 8192, "gqa_v_o": True, "device": "cuda",
                   "clip_min_ratio": 0.4}
    assert AWQConfig(**got).search_tokens == 8192
    assert parse_overrides(SmoothQuantConfig, ["alpha_grid=0.5,1,1.5"]) == {
        "alpha_grid": (0.5, 1.0, 1.5)}
    got = parse_overrides(SmoothQuantConfig, ["alpha=0.75"])  # an optional float field
    assert got == {"alpha": 0.75} and SmoothQuantConfig(**got).alpha == 0.75
    assert parse_overrides(SmoothQuantConfig, ["alpha=none"]) == {"alpha": None}
    with pytest.raises(ConfigError, match="unknown AWQConfig key"):
        parse_overrides(AWQConfig, ["no_such_field=1"])
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_overrides(AWQConfig, ["search_tokens"])
    assert parse_overrides(AWQConfig, ["gqa_v_o=off"]) == {"gqa_v_o": False}
    with pytest.raises(ConfigError, match="gqa_v_o is a flag; use true or false"):
        parse_overrides(AWQConfig, ["gqa_v_o=flase"])        # a typo is not False
    with pytest.raises(ConfigError, match="search_tokens takes a int"):
        parse_overrides(AWQConfig, ["search_tokens=8k"])
    with pytest.raises(ConfigError, match="alpha takes a float or none"):
        parse_overrides(SmoothQuantConfig, ["alpha=abc"])


def test_targets_and_exclude_given_as_one_string_are_one_pattern():
    """A str is one pattern (a recipe's "targets": "model.layers.0.*"), not its characters,
    which would include a lone '*' that matches every layer."""
    cfg = get_preset("w8a8").replace(targets="model.layers.0.*", exclude="*lm_head*")
    assert cfg.targets == ("model.layers.0.*",) and cfg.exclude == ("*lm_head*",)
    data = get_preset("w8a8").to_dict()
    data.update(targets="model.layers.0.*", exclude=["*lm_head*", "*gate*"])
    back = QuantConfig.from_dict(data)
    assert back.targets == ("model.layers.0.*",) and back.exclude == ("*lm_head*", "*gate*")
    with pytest.raises(ConfigError, match="targets must be a tuple of strings"):
        get_preset("w8a8").replace(targets=("a", 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(symmetric="no"), "symmetric must be true or false"),
    (dict(dynamic=1), "dynamic must be true or false"),
    (dict(granularity="per_block", block_size="64"), "block_size must be an int"),
    (dict(percentile="99"), "percentile must be a number"),
])
def test_quantizer_spec_types_are_checked(kwargs, match):
    """A quoted YAML value ("no" is a true string) or a number given as text: a ConfigError
    naming the field, not a silently wrong spec or a TypeError later."""
    with pytest.raises(ConfigError, match=match):
        QuantizerSpec(**kwargs)


def test_from_dict_weight_must_be_a_mapping():
    with pytest.raises(ConfigError, match="weight must be a mapping"):
        QuantConfig.from_dict({"weight": [4]})


def test_get_preset_with_a_block_size():
    cfg = get_preset("int4_awq", block_size=64)
    assert cfg.weight.block_size == 64 and cfg.algorithm == get_preset("int4_awq").algorithm
    assert get_preset("int4_awq").weight.block_size == 128          # the preset is unchanged
    with pytest.raises(ConfigError, match="'w8a8' does not quantize weights per block"):
        get_preset("w8a8", block_size=64)
