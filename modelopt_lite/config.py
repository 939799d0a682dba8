"""Typed, frozen quantization configs with presets and a JSON round trip.

A :class:`QuantConfig` says how weights and activations are quantized, which layers are
targeted, what to do with a layer a block size does not fit, and which calibration algorithm
runs. Algorithm settings are their own frozen dataclasses, registered by name, so a checkpoint
records exactly how it was made::

    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=64))
    cfg = get_preset("int4_weight_only").replace(exclude=("*lm_head*", "*down_proj*"))
    cfg = QuantConfig.from_json(cfg.to_json())
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

CONFIG_VERSION = 1

GRANULARITIES = ("per_tensor", "per_channel", "per_block", "per_token")
CALIBRATORS = ("max", "percentile", "mse")
ON_INDIVISIBLE = ("skip", "error", "per_channel")
# the output head and embeddings, and MoE routers (a router's small error changes which
# experts run; every MoE toolkit keeps it in float)
DEFAULT_EXCLUDE = ("*lm_head*", "*embed*", "*wte*", "*wpe*", "*router*", "*mlp.gate",
                   "*mlp.gate.*", "*block_sparse_moe.gate", "*shared_expert_gate*")
DEFAULT_MODULE_TYPES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d")


class ConfigError(ValueError):
    """A config key, value or combination that is not allowed."""


def _check_keys(cls, data: dict) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {unknown}; allowed keys are {sorted(allowed)}"
        )


def parse_overrides(cls, items) -> dict:
    """``["field=value", ...]`` -> keyword arguments for the config dataclass ``cls``, each value
    typed like the field's default (``true``/``false`` for flags, ``a,b,c`` for tuples of
    numbers or names, an empty value for an empty tuple; where the default is None: ``none``,
    a number, or else text). For command-line ``--set`` style options."""
    defaults = {f.name: f.default for f in fields(cls)}
    types = {f.name: str(f.type) for f in fields(cls)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: expected FIELD=VALUE")
        _check_keys(cls, {key: None})
        default = defaults[key]
        if isinstance(default, bool):
            flag = value.lower()
            if flag not in _TRUE + _FALSE:
                raise ConfigError(f"{item!r}: {key} is a flag; use true or false")
            out[key] = flag in _TRUE
        elif isinstance(default, tuple):
            out[key] = tuple(_number_or_text(v) for v in value.split(",") if v)
        elif default is None or default is dataclasses.MISSING:
            out[key] = _scalar(value)
            # an optional number (``alpha: float | None``): text is a typo, not a value
            kind = next((k for k in ("float", "int") if k in types[key]), None)
            if kind and isinstance(out[key], str):
                raise ConfigError(f"{item!r}: {key} takes a {kind} or none")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ConfigError(f"{item!r}: {key} takes a {type(default).__name__} "
                                  f"(default {default!r})") from None
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _scalar(value: str):
    if value.lower() == "none":
        return None
    return _number_or_text(value)


def _number_or_text(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor (a weight or an activation) is fake-quantized.

    ``num_bits``: 8 or 4. ``granularity``: ``per_tensor``, ``per_channel`` (weights: one
    scale per output channel), ``per_block`` (weights: blocks of ``block_size`` along the input
    dimension) or ``per_token`` (activations, dynamic only). ``symmetric=False`` adds a zero
    point (weights only); ``integer_zero=True`` rounds it to an integer code, as AutoAWQ and
    GPTQ checkpoints store it: 0 becomes one of each block's levels, so 2:4-sparse layers can be
    deployed, and deployed INT4 layers read 4-bit zero points (2 % fewer bytes on large
    layers); whether it fits better than the default float zero point (each block's min / max
    exactly) depends on the model (benchmarks/README.md: SmolLM2 7 % lower perplexity, Gemma 3
    1-5 % higher). ``dynamic`` activations
    compute their range on every call instead of using calibrated static scales.
    ``calibrator`` picks how a static activation range is set.
    """

    num_bits: int = 8
    granularity: str = "per_channel"
    block_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    calibrator: str = "max"
    percentile: float = 99.99
    integer_zero: bool = False

    def __post_init__(self):
        for name in ("symmetric", "dynamic", "integer_zero"):   # "no" in a YAML file is truthy
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"QuantizerSpec.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool)
                                            or not isinstance(self.block_size, int)):
            raise ConfigError(f"QuantizerSpec.block_size must be an int, got {self.block_size!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise ConfigError(f"QuantizerSpec.percentile must be a number, got {self.percentile!r}")
        _one_of("num_bits", self.num_bits, (4, 8))
        _one_of("granularity", self.granularity, GRANULARITIES)
        _one_of("calibrator", self.calibrator, CALIBRATORS)
        if (self.granularity == "per_block") != (self.block_size is not None):
            raise ConfigError(
                "block_size goes with granularity='per_block' and only with it "
                f"(got granularity={self.granularity!r}, block_size={self.block_size!r})"
            )
        if self.block_size is not None and (self.block_size < 2 or self.block_size % 2):
            raise ConfigError(f"block_size must be an even number >= 2, got {self.block_size}")
        if self.granularity == "per_token" and not self.dynamic:
            raise ConfigError("granularity='per_token' needs dynamic=True (ranges per call)")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.integer_zero and self.symmetric:
            raise ConfigError("integer_zero=True rounds the zero point of asymmetric "
                              "quantization; set symmetric=False with it (symmetric ranges "
                              "have no zero point)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1 if self.symmetric else 2**self.num_bits - 1

    def describe(self) -> str:
        kind = {"per_block": f"block {self.block_size}", "per_tensor": "per-tensor",
                "per_channel": "per-channel", "per_token": "per-token"}[self.granularity]
        mode = "sym" if self.symmetric else ("asym int-zero" if self.integer_zero else "asym")
        dyn = " dynamic" if self.dynamic else ""
        return f"int{self.num_bits} {mode} {kind}{dyn}"

    @classmethod
    def from_dict(cls, data: dict) -> QuantizerSpec:
        _check_keys(cls, data)
        return cls(**data)


# --- algorithm configs: one frozen dataclass per method, registered by name ---

ALGORITHMS: dict[str, type] = {}


def register_algorithm(name: str):
    """Class decorator that registers an algorithm config under ``name``."""

    def wrap(cls):
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return wrap


@register_algorithm("max")
@dataclass(frozen=True)
class MaxCalibConfig:
    """Round-to-nearest: weight ranges from the weights, activation ranges from calibration."""

    name: ClassVar[str]


def _load_builtins() -> None:
    from .algorithms import load_builtins

    load_builtins()


def algorithm_from_dict(data: dict | str):
    _load_builtins()
    if isinstance(data, str):
        data = {"name": data}
    data = dict(data)
    name = data.pop("name", None)
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; registered: {sorted(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    _check_keys(cls, data)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def algorithm_to_dict(algo) -> dict:
    return {"name": algo.name, **dataclasses.asdict(algo)}


@dataclass(frozen=True)
class QuantConfig:
    """Everything ``quantize()`` needs to know, frozen and JSON round-trippable.

    ``targets`` and ``exclude`` are fnmatch patterns over module names (``exclude`` wins);
    ``module_types`` are class names (``Linear``, Hugging Face's ``Conv1D``, torch's ``Conv1d``,
    ``Conv2d``, ``Conv3d``). ``on_indivisible`` says what happens to a layer whose input dim
    is not a multiple of ``weight.block_size``:
    ``skip`` (listed in the summary), ``error``, or ``per_channel`` (quantize that layer per
    output channel instead).

    A layer named exactly in ``targets`` is quantized where a default rule would leave it in
    float (an MoE router, a recurrent mixer's causal conv, a conv under INT4 block weights):
    ``targets=("*", "model.layers.0.mixer.conv1d")``. With ``"*"`` among the targets, a
    multimodal model's encoders of other inputs stay in float except what the other patterns
    match; targets without ``"*"`` are taken as written.
    """

    weight: QuantizerSpec | None = field(default_factory=QuantizerSpec)
    input: QuantizerSpec | None = None
    algorithm: Any = field(default_factory=MaxCalibConfig)
    targets: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    module_types: tuple[str, ...] = DEFAULT_MODULE_TYPES
    on_indivisible: str = "skip"
    version: int = CONFIG_VERSION

    def __post_init__(self):
        for key in ("targets", "exclude", "module_types"):
            value = getattr(self, key)
            if isinstance(value, str):   # one pattern, not its characters
                value = (value,)
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key} must be a tuple of strings, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        _one_of("on_indivisible", self.on_indivisible, ON_INDIVISIBLE)
        if self.weight is None and self.input is None:
            raise ConfigError("a QuantConfig needs a weight or an input quantizer spec")
        w, a = self.weight, self.input
        if w is not None and w.dynamic:
            raise ConfigError("weights are always quantized statically; set weight.dynamic=False")
        if w is not None and w.granularity == "per_token":
            raise ConfigError("per_token is an activation granularity; weights use "
                              "per_tensor, per_channel or per_block")
        if a is not None:
            if a.granularity in ("per_block", "per_channel"):
                raise ConfigError("activations are quantized per_tensor (static or dynamic) or "
                                  f"per_token (dynamic), not {a.granularity}")
            if not a.symmetric:
                raise ConfigError("activation quantization is symmetric (TensorRT's rule); "
                                  "set input.symmetric=True")
        if self.version > CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is newer than this modelopt_lite "
                              f"understands ({CONFIG_VERSION}); upgrade modelopt_lite")
        if type(self.algorithm).__name__ not in {c.__name__ for c in ALGORITHMS.values()}:
            raise ConfigError(f"algorithm must be a registered config, one of {sorted(ALGORITHMS)}")

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    # --- serialisation ---
    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "algorithm":
                value = algorithm_to_dict(value)
            elif isinstance(value, QuantizerSpec):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        _check_keys(cls, data)
        kwargs = dict(data)
        for key in ("weight", "input"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = QuantizerSpec.from_dict(kwargs[key])
            elif kwargs.get(key) is not None and not isinstance(kwargs[key], QuantizerSpec):
                raise ConfigError(f"{key} must be a mapping of QuantizerSpec fields (or null), "
                                  f"got {kwargs[key]!r}")
        if "algorithm" in kwargs:
            kwargs["algorithm"] = algorithm_from_dict(kwargs["algorithm"])
        for key in ("targets", "exclude", "module_types"):
            if key in kwargs and not isinstance(kwargs[key], str):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> QuantConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls, path: str | Path) -> QuantConfig:
        """Load a config from a ``.json`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(path.read_text()))
        return cls.from_json(path)


# --- presets ---

PRESETS: dict[str, QuantConfig] = {}


def register_preset(name: str, config: QuantConfig) -> QuantConfig:
    PRESETS[name] = config
    return config


register_preset("int8_weight_only", QuantConfig(weight=QuantizerSpec(num_bits=8)))
register_preset("int4_weight_only", QuantConfig(
    weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=128, symmetric=False)))
register_preset("int4_weight_only_sym", QuantConfig(
    weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=128)))
register_preset("w8a8", QuantConfig(
    weight=QuantizerSpec(num_bits=8), input=QuantizerSpec(num_bits=8, granularity="per_tensor")))
register_preset("w8a8_dynamic", QuantConfig(
    weight=QuantizerSpec(num_bits=8),
    input=QuantizerSpec(num_bits=8, granularity="per_token", dynamic=True)))


def get_preset(name: str, block_size: int | None = None) -> QuantConfig:
    """The preset ``name``; ``block_size`` replaces an INT4 preset's weight block size (e.g. 64
    for models whose widths are not multiples of 128).

        >>> get_preset("int4_awq", block_size=64).weight.block_size
        64
    """
    _load_builtins()
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if block_size is None:
        return cfg
    if cfg.weight is None or cfg.weight.granularity != "per_block":
        raise ConfigError(f"block_size={block_size}: preset {name!r} does not quantize weights "
                          "per block")
    return cfg.replace(weight=dataclasses.replace(cfg.weight, block_size=block_size))


def resolve_config(config) -> QuantConfig:
    """Accept a preset name, a QuantConfig, a dict, or a path to a JSON/YAML file."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        _load_builtins()
        if str(config) in PRESETS:
            return PRESETS[str(config)]
        if Path(config).suffix.lower() in (".json", ".yaml", ".yml"):
            if not Path(config).is_file():
                raise ConfigError(f"config file '{config}' does not exist (presets: "
                                  f"{sorted(PRESETS)})")
            return QuantConfig.from_file(config)
        return get_preset(str(config))
    raise ConfigError(f"config must be a preset name, a QuantConfig, a dict or a JSON/YAML path; "
                      f"got {type(config).__name__}")
