"""nlm.config, the one config system: YAML with file:line errors, pydantic type checks naming the
field, the dataclass -> argparse binding, composed sections. Fast: no Ray, no torch engine."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from nlm.cluster.train.config import TrainConfig
from nlm.config import Config, add_config_arguments, args_to_dict, option, read_yaml, section
from nlm.errors import NLMError
from nlm.finetune.config import FinetuneConfig
from nlm.optim import OptimConfig
from nlm.scale import ScaleConfig


@dataclasses.dataclass
class Inner(Config):
    rate: float = option(0.5, "a rate")
    names: list[str] = option([], "some names")


@dataclasses.dataclass
class Outer(Config):
    size: int = option(3, "how many")
    label: str | None = option(None, "a label", flag="--tag")
    extra: dict[str, float] = option({}, "NAME=AMOUNT pairs", flag="--extra")
    enabled: bool = option(False, "switch")
    inner: Inner = section(Inner, "the inner section", rate=0.25)


# --- YAML ---------------------------------------------------------------------------------------


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("size: 3\nlabel: x\ninner: {rate: [1,\n")
    with pytest.raises(NLMError, match=r"broken\.yaml:\d+: invalid YAML"):
        read_yaml(path)


def test_yaml_that_is_not_a_mapping_or_missing(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(NLMError, match=r"list\.yaml:1: expected a mapping"):
        read_yaml(path)
    with pytest.raises(NLMError, match="no such config file"):
        read_yaml(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


def test_type_error_names_the_field_and_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 3\n\nrate: 1e-3\n")  # YAML reads 1e-3 (no dot) as a string
    with pytest.raises(
        NLMError, match=r"c\.yaml:3 \(field 'rate'\): expected a number, got '1e-3'"
    ):
        Outer.load_yaml(path)
    path.write_text("size: three\n")
    with pytest.raises(NLMError, match=r"c\.yaml:1 \(field 'size'\): expected an integer"):
        Outer.load_yaml(path)
    path.write_text("enabled: 1\n")  # no 1 -> true
    with pytest.raises(NLMError, match=r"\(field 'enabled'\): expected true or false"):
        Outer.load_yaml(path)
    path.write_text("extra: {gpu_a: many}\n")
    with pytest.raises(NLMError, match=r"\(field 'extra'\)"):
        Outer.load_yaml(path)


def test_unknown_key_names_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 3\nsise: 4\n")
    with pytest.raises(NLMError, match=r"c\.yaml:2: unknown field 'sise' for Outer"):
        Outer.load_yaml(path)


def test_python_values_are_checked_too():
    with pytest.raises(NLMError, match=r"\(field 'workers'\): expected an integer"):
        TrainConfig.from_dict({"data": "d", "out": "o", "workers": "2"}).check()
    with pytest.raises(NLMError, match=r"\(field 'lr'\)"):
        FinetuneConfig.from_dict({"lr": "fast"})


def test_an_integer_where_a_number_is_declared_becomes_a_float():
    config = Outer.from_dict({"rate": 1, "extra": {"a": 2}})
    assert config.inner.rate == 1.0 and isinstance(config.inner.rate, float)
    assert isinstance(config.extra["a"], float)


# --- sections -----------------------------------------------------------------------------------


def test_flat_keys_fill_the_sections_and_round_trip(tmp_path):
    config = Outer.from_dict({"size": 5, "rate": 0.75, "names": ["a"], "extra": {"x": 1.5}})
    assert config.inner == Inner(rate=0.75, names=["a"])
    assert config.flat_dict() == {
        "size": 5, "label": None, "extra": {"x": 1.5}, "enabled": False, "rate": 0.75, "names": ["a"],
    }  # fmt: skip
    assert config.to_dict()["inner"] == {"rate": 0.75, "names": ["a"]}
    path = tmp_path / "c.yaml"
    config.save_yaml(path)
    assert yaml.safe_load(path.read_text())["rate"] == 0.75  # written flat, as flags spell it
    assert Outer.load_yaml(path) == config
    assert Outer.from_dict(config.to_dict()) == config  # the nested form is read too


def test_a_section_keeps_its_owners_defaults():
    assert Outer().inner.rate == 0.25 and Outer.from_dict({"names": ["b"]}).inner.rate == 0.25
    assert Outer().inner.names is not Outer().inner.names  # no shared mutable default
    assert FinetuneConfig().optim.lr == 1e-4 and TrainConfig().optim.lr is None
    assert FinetuneConfig().scale.workers == 1 and TrainConfig().scale.workers == 2
    assert FinetuneConfig().optim.betas == [0.9, 0.999]


def test_replace_takes_flat_section_fields():
    config = TrainConfig().replace(lr=2e-3, zero_stage=3, max_steps=7)
    assert (config.optim.lr, config.scale.zero_stage, config.max_steps) == (2e-3, 3, 7)
    with pytest.raises(TypeError, match="no field 'speed'"):
        TrainConfig().replace(speed=1)


def test_train_and_finetune_share_the_sections():
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    finetune = {f.name for f in dataclasses.fields(FinetuneConfig)}
    shared = {f.name for f in dataclasses.fields(OptimConfig)} | {
        f.name for f in dataclasses.fields(ScaleConfig)
    }
    assert not shared & train and not shared & finetune  # declared once, in the sections
    assert {"optim", "scale"} <= train & finetune


def test_an_old_flat_run_config_still_loads(tmp_path):
    """RUN/config.yaml as runs wrote it before the sections existed (flat, every field)."""
    old = {
        "data": "/shards/wt2", "model": "lstm", "preset": "small", "model_overrides": {},
        "out": "/runs/lstm", "workers": 2, "cpus_per_worker": 0.5, "worker_resources": {},
        "device": "auto", "zero_stage": 2, "torch_threads": 0, "micro_batch": 16,
        "grad_accum": 1, "max_steps": 200, "shuffle": True, "chunk_rows": 0,
        "materialize_mb": 1024, "optimizer": "sgd", "lr": 20.0, "min_lr": 2.0,
        "warmup_steps": 100, "lr_schedule": "cosine", "weight_decay": 0.1,
        "betas": [0.9, 0.95], "momentum": 0.0, "grad_clip": 0.25, "mlm_prob": 0.15,
        "seed": 1337, "eval_every": 200, "eval_rows": 0, "log_every": 10,
        "checkpoint_every": 0, "keep_checkpoints": 2, "max_failures": 2, "resume": False,
        "placement_timeout_s": 0.0, "storage": "", "shared_fs": False,
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    config = TrainConfig.load_yaml(path).check(str(path))
    assert (config.optim.optimizer, config.optim.lr, config.optim.grad_clip) == ("sgd", 20.0, 0.25)
    assert (config.scale.zero_stage, config.scale.workers, config.max_steps) == (2, 2, 200)
    flat = config.flat_dict()
    assert {k: flat[k] for k in old} == old  # nothing lost or renamed


# --- argparse -----------------------------------------------------------------------------------


def parser_for(cls: type[Config]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    return parser


def test_every_field_is_a_flag_with_its_help_and_default():
    text = parser_for(Outer).format_help()
    assert "--size SIZE" in text and "how many (default: 3)" in text
    assert "--tag LABEL" in text and "--extra" in text and "--enabled, --no-enabled" in text
    assert "the inner section:" in text and "a rate (default: 0.25)" in text  # the owner's
    help_text = parser_for(FinetuneConfig).format_help()
    assert "(default: 0.0001)" in help_text and "(default: 0.9,0.999)" in help_text


def test_flags_override_the_file_and_merge_mappings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 4\nextra: {a: 1}\nrate: 0.5\n")
    args = parser_for(Outer).parse_args(
        ["--size", "9", "--extra", "b=2", "--names", "x", "y", "--enabled"]
    )
    data = args_to_dict(Outer, args, read_yaml(path))
    config = Outer.from_dict(data, source=str(path))
    assert config.size == 9 and config.enabled and config.inner.names == ["x", "y"]
    assert config.extra == {"a": 1.0, "b": 2.0} and config.inner.rate == 0.5
    assert args_to_dict(Outer, parser_for(Outer).parse_args([]), {}) == {}  # nothing given


def test_train_flags_cover_every_field():
    parser = parser_for(TrainConfig)
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in TrainConfig.flat_fields()} <= dests
    args = parser.parse_args(["--betas", "0.8,0.9", "--set", "dropout=0.3", "--lr", "3e-4"])
    config = TrainConfig.from_dict(args_to_dict(TrainConfig, args))
    assert config.optim.betas == [0.8, 0.9] and config.optim.lr == 3e-4
    assert config.model_overrides == {"dropout": 0.3}


# --- the one schedule ---------------------------------------------------------------------------


def test_finetune_warmup_fraction_and_the_demos_clock_use_the_same_schedule():
    from nlm.optim import Schedule
    from nlm.workflows.foundation_demo import WARMUP_STEPS, learning_rate

    optim = FinetuneConfig().optim  # warm-up: a tenth of the steps
    schedule = optim.schedule(200)
    assert schedule.warmup == 20 and schedule.at(19) == pytest.approx(1e-4)
    assert schedule.at(200) == pytest.approx(1e-5)
    # the one-process demo: the same warm-up, then the cosine follows the clock (`done`)
    assert learning_rate(1.0, WARMUP_STEPS - 1, 0.0) == pytest.approx(1.0)
    assert learning_rate(1.0, 500, 0.5) == pytest.approx(Schedule(1.0, 0.1, 0, 0).at(0, 0.5))
    assert learning_rate(1.0, 500, 1.0) == pytest.approx(0.1)
