"""Tests for tulu_jax.configlib: strict typing, dotted errors, YAML + CLI overrides, round trip, help."""

from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any, Literal

import pytest
import yaml

from tulu_jax.configlib import ConfigError, config_help, from_dict, load_config, to_dict


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps spent warming up."})

    def __post_init__(self):
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    datasets: tuple[str, ...] = field(default=(), metadata={"help": "Dataset names."})
    seq_lens: tuple[int, ...] = field(default=(1, 2), metadata={"help": "Bucket lengths."})
    mixture: dict[str, float] = field(default_factory=dict, metadata={"help": "Sampling weight per dataset."})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Free-form options."})
    max_seq_len: int = field(default=4096, metadata={"help": "Truncate longer sequences."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle every epoch."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where tokenized data is cached."})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = field(default="run", metadata={"help": "Run name."})
    seed: int = field(default=123, metadata={"help": "Random seed."})
    reduction: Literal["sum", "mean"] = field(default="sum", metadata={"help": "SFT loss reduction."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data pipeline."})


@dataclass(frozen=True, kw_only=True)
class NeedsName:
    name: str = field(metadata={"help": "Required."})


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# --- defaults and basic loading -------------------------------------------------------------------


def test_defaults_from_empty_inputs(tmp_path):
    assert from_dict(RunConfig, {}) == RunConfig()
    assert load_config(RunConfig, None, []) == RunConfig()
    assert load_config(RunConfig, _write(tmp_path, ""), []) == RunConfig()
    assert load_config(RunConfig, _write(tmp_path, "optim:\n"), []) == RunConfig()  # empty section


def test_nested_values_and_frozen():
    cfg = from_dict(RunConfig, {"seed": 7, "optim": {"learning_rate": 1e-5}, "data": {"max_seq_len": 128}})
    assert cfg.seed == 7 and cfg.optim.learning_rate == 1e-5 and cfg.data.max_seq_len == 128
    assert cfg.optim.warmup_ratio == 0.03  # missing field keeps its default
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 1


def test_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "seed: 1\noptim:\n  learning_rate: 2.0e-6\n")
    cfg = load_config(RunConfig, path, ["optim.learning_rate=1e-5", "seed=9"])
    assert cfg.optim.learning_rate == pytest.approx(1e-5) and cfg.seed == 9


def test_override_creates_keys_missing_from_yaml(tmp_path):
    path = _write(tmp_path, "seed: 1\n")
    cfg = load_config(RunConfig, path, ["data.max_seq_len=256", "data.mixture.tulu=0.5"])
    assert cfg.data.max_seq_len == 256 and cfg.data.mixture == {"tulu": 0.5}


def test_override_yaml_values():
    cfg = load_config(RunConfig, None, ["data.shuffle=false", "data.cache_dir=/tmp/x", "data.extra={a: 1, b: [x]}"])
    assert cfg.data.shuffle is False and cfg.data.cache_dir == "/tmp/x"
    assert cfg.data.extra == {"a": 1, "b": ["x"]}
    assert load_config(RunConfig, None, ["data.cache_dir=null"]).data.cache_dir is None


# --- floats ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("5e-6", 5e-6), ("1E5", 1e5), ("-2.5e-3", -2.5e-3), ("3", 3.0)])
def test_float_from_exponent_without_dot(tmp_path, text, expected):
    # PyYAML reads `5e-6` as a string; float fields must still take it, from CLI and from the file.
    cfg = load_config(RunConfig, None, [f"optim.learning_rate={text}"])
    assert isinstance(cfg.optim.learning_rate, float) and cfg.optim.learning_rate == expected
    cfg = load_config(RunConfig, _write(tmp_path, f"optim:\n  learning_rate: {text}\n"), [])
    assert cfg.optim.learning_rate == expected


def test_int_accepted_for_float_but_not_bool_or_text():
    assert from_dict(OptimConfig, {"learning_rate": 1}).learning_rate == 1.0
    for bad in (True, "abc", "1e", None, [1.0]):
        with pytest.raises(ConfigError, match="learning_rate"):
            from_dict(OptimConfig, {"learning_rate": bad})


# --- strict types and error messages ---------------------------------------------------------------


def test_wrong_type_names_dotted_key_expected_type_and_value():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"optim": {"learning_rate": "fast"}})
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "float" in msg and "'fast'" in msg


@pytest.mark.parametrize("bad", [1.5, "5", True, None])
def test_int_is_strict(bad):
    with pytest.raises(ConfigError, match=r"data\.max_seq_len.*int"):
        from_dict(RunConfig, {"data": {"max_seq_len": bad}})


@pytest.mark.parametrize("bad", [1, 0, "yes", "true", None])
def test_bool_is_strict(bad):
    with pytest.raises(ConfigError, match=r"data\.shuffle.*bool"):
        from_dict(RunConfig, {"data": {"shuffle": bad}})


def test_str_and_optional():
    with pytest.raises(ConfigError, match=r"^name: expected str"):
        from_dict(RunConfig, {"name": 3})
    with pytest.raises(ConfigError, match=r"data\.cache_dir.*str \| None"):
        from_dict(RunConfig, {"data": {"cache_dir": 5}})


def test_unknown_key_names_dotted_key_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"optim": {"lr": 1e-5}})
    msg = str(err.value)
    assert "optim.lr" in msg and "learning_rate" in msg and "warmup_ratio" in msg
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*seed"):
        load_config(RunConfig, None, ["sed=1"])


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="optim"):
        from_dict(RunConfig, {"optim": 3})
    with pytest.raises(ConfigError, match="not a section"):
        load_config(RunConfig, None, ["seed=1", "seed.x=2"])


def test_missing_required_field():
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        from_dict(NeedsName, {})
    assert from_dict(NeedsName, {"name": "a"}).name == "a"


def test_literal():
    assert from_dict(RunConfig, {"reduction": "mean"}).reduction == "mean"
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, ["reduction=max"])
    assert "reduction" in str(err.value) and "'sum'" in str(err.value) and "'max'" in str(err.value)


# --- tuples and dicts ------------------------------------------------------------------------------


def test_tuple_from_list_or_comma_string():
    assert load_config(RunConfig, None, ["data.datasets=a,b"]).data.datasets == ("a", "b")
    assert load_config(RunConfig, None, ["data.datasets=[a, b, c]"]).data.datasets == ("a", "b", "c")
    assert load_config(RunConfig, None, ["data.datasets=single"]).data.datasets == ("single",)
    assert load_config(RunConfig, None, ["data.seq_lens=128, 256"]).data.seq_lens == (128, 256)
    assert load_config(RunConfig, None, ["data.seq_lens=[512]"]).data.seq_lens == (512,)
    with pytest.raises(ConfigError, match=r"data\.seq_lens\[1\].*int"):
        load_config(RunConfig, None, ["data.seq_lens=1,x"])
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\].*str"):
        from_dict(RunConfig, {"data": {"datasets": [1]}})


def test_dict_values_are_checked():
    cfg = from_dict(RunConfig, {"data": {"mixture": {"a": 1, "b": 0.5}}})
    assert cfg.data.mixture == {"a": 1.0, "b": 0.5} and isinstance(cfg.data.mixture["a"], float)
    with pytest.raises(ConfigError, match=r"data\.mixture\.b.*float"):
        from_dict(RunConfig, {"data": {"mixture": {"a": 1, "b": "x"}}})
    with pytest.raises(ConfigError, match=r"data\.mixture.*dict"):
        from_dict(RunConfig, {"data": {"mixture": [1]}})


# --- overrides and validation ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["optim.learning_rate", "=5", "optim..learning_rate=1", "seed=[1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        load_config(RunConfig, None, [bad])


def test_post_init_validation_is_wrapped_with_section_path():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, ["optim.warmup_ratio=2"])
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith("optim") and "warmup_ratio must be in [0, 1)" in str(err.value)


def test_top_level_yaml_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, _write(tmp_path, "- a\n- b\n"), [])


# --- round trip and help ---------------------------------------------------------------------------


def test_round_trip_through_yaml():
    cfg = load_config(
        RunConfig,
        None,
        ["optim.learning_rate=5e-6", "data.datasets=a,b", "data.mixture.a=0.3", "data.cache_dir=/c"],
    )
    dumped = yaml.safe_dump(to_dict(cfg))  # tuples must be lists for safe_dump
    assert from_dict(RunConfig, yaml.safe_load(dumped)) == cfg
    assert to_dict(cfg)["data"]["datasets"] == ["a", "b"]


def test_config_help_lists_every_dotted_key():
    text = config_help(RunConfig)
    for key in (
        "name",
        "seed",
        "reduction",
        "optim.learning_rate",
        "optim.warmup_ratio",
        "data.datasets",
        "data.seq_lens",
        "data.mixture",
        "data.extra",
        "data.max_seq_len",
        "data.shuffle",
        "data.cache_dir",
    ):
        assert any(line.startswith(key + " (") for line in text.splitlines()), key
    assert "optim.learning_rate (float, default 5e-06): Peak learning rate." in text
    assert "data.cache_dir (str | None, default None)" in text
    assert "Literal['sum', 'mean']" in text and "tuple[int, ...]" in text
    assert "Data pipeline." in text


def test_not_a_dataclass():
    with pytest.raises(TypeError):
        from_dict(int, {})


def test_section_validation_errors_name_the_key():
    """A section's __post_init__ message is reported under the key it names (first named field wins), and
    under the section with its class name when it names none."""
    from tulu_jax.config import SFTConfig

    cases = {
        "data.chat_template=chatml": "data.chat_template: unknown chat_template 'chatml'",
        "train.log_every=0": "train.log_every: log_every must be >= 1, got 0",
        "train.num_epochs=0": "train.num_epochs: num_epochs must be >= 1, got 0",
        "checkpoint.every_steps=-2": "checkpoint.every_steps: every_steps must be >= 0",
        "data.num_workers=-1": "data.num_workers: num_workers must be >= 0, got -1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(SFTConfig, None, [override])
        assert str(err.value).startswith(message), (override, str(err.value))

    @dataclass(frozen=True)
    class Section:
        lo: int = 0
        hi: int = 1

        def __post_init__(self):
            if self.lo > self.hi:
                raise ValueError("the range is empty")

    @dataclass(frozen=True)
    class Root:
        span: Section = field(default_factory=Section)

    with pytest.raises(ConfigError, match=r"^span \(Section\): the range is empty$"):
        from_dict(Root, {"span": {"lo": 3}})
