"""The ``train`` and ``model`` groups' structured-config schemas (m4fuse.run.settings.register_schemas): a misspelt
key or a value of the wrong type fails at compose time naming the key, the composed config is
what the YAML gives, and the override forms of the other groups keep working."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from m4fuse.run import settings
from m4fuse.run.config_check import ConfigError
from m4fuse.training.engine import TrainConfig


@pytest.mark.parametrize("override, key", [
    ("train.lrr=0.1", "train.lrr"),  # misspelt, without '+'
    ("train.lr=abc", "train.lr"),  # not a float
    ("train.batch_size=2.5", "train.batch_size"),  # not an int
    ("train.amp=maybe", "train.amp"),  # not a bool
    ("train.amp_cpu=maybe", "train.amp_cpu"),  # not a bool
    ("train.num_workers=many", "train.num_workers"),  # a loader key: not an int
    ("model.d_stat=8", "model.d_stat"),  # misspelt model key
    ("model.dropout=high", "model.dropout"),  # not a float
    ("model.widths=[8,a,24,32,48,64]", "model.widths"),  # not a list of ints
])
def test_a_misspelt_key_or_a_wrong_type_fails_at_compose_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        settings.compose("config", [override])
    text = str(caught.value)
    assert key in text and "\n" not in text  # one line
    assert isinstance(caught.value.__cause__, ConfigCompositionException)


def test_the_schema_is_the_train_config_fields_of_the_yaml_plus_the_loader_keys():
    schema = settings.TrainSchema
    names = [f.name for f in dataclasses.fields(schema)]
    assert names == [*settings.TRAIN_KEYS, "augment", "num_workers"]
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(schema)[:len(settings.TRAIN_KEYS)]:
        assert f.default == train_fields[f.name].default


def test_the_composed_train_group_holds_the_yaml_values_and_keys():
    cfg = settings.compose("config")
    assert list(cfg.train) == [*settings.TRAIN_KEYS, "augment", "num_workers"]
    assert OmegaConf.to_container(cfg.train)["lr"] == 0.008
    assert cfg.train.batch_size == 2 and cfg.train.grad_clip == 12.0
    pickle.loads(pickle.dumps(cfg))  # the schema class is a module attribute


@pytest.mark.parametrize("overrides", [
    ["+fl.faults={site0:{crash_round:2}}"],
    ["+fl.faults.site1.nan_round=1"],
    ["model=paper", "model.preset=B"],
    ["data.size=[64,128,128]"],
    ["train.grad_clip=null"],
    ["+train.betas=[0.9,0.99]"],  # a TrainConfig field outside the YAML, added with '+'
])
def test_the_existing_override_forms_still_compose(overrides):
    cfg = settings.compose("config", overrides)
    if overrides[0].startswith("+train.betas"):
        assert tuple(settings.train_config(cfg, 1).betas) == (0.9, 0.99)
    if overrides[0] == "train.grad_clip=null":
        assert settings.train_config(cfg, 1).grad_clip is None


def test_cpu_autocast_is_off_by_default_and_bfloat16_only():
    cfg = settings.compose("config")
    assert cfg.train.amp_cpu is False and settings.train_config(cfg, 1).amp_cpu is False
    on = settings.compose("config", ["train.amp_cpu=true"])
    assert settings.train_config(on, 1).amp_cpu is True
    assert settings.amp_settings(on) == {"amp": True, "amp_dtype": "bfloat16", "amp_cpu": True}
    with pytest.raises(ValueError, match="train.amp_cpu=true.*bfloat16 only.*'float16'"):
        settings.compose("config", ["train.amp_cpu=true", "train.amp_dtype=float16"])
    # float16 without amp_cpu (CUDA only) and amp_cpu with amp off both compose
    settings.compose("config", ["train.amp_dtype=float16"])
    settings.compose("config", ["train.amp=false", "train.amp_cpu=true",
                                "train.amp_dtype=float16"])


def test_the_model_schema_is_the_network_config_fields_plus_preset_and_widths():
    from m4fuse.nets.model import M4FuseConfig

    schema = settings.ModelSchema
    names = [f.name for f in dataclasses.fields(schema)]
    assert names == [*settings.MODEL_KEYS, "preset", "widths"]
    model_fields = {f.name: f for f in dataclasses.fields(M4FuseConfig)}
    for f in dataclasses.fields(schema)[:len(settings.MODEL_KEYS)]:
        assert f.default == model_fields[f.name].default
    for group, preset, widths in (("tiny", None, [8, 16, 24, 32, 48, 64]),
                                  ("paper", "T", None)):
        cfg = settings.compose("config", [f"model={group}"])
        assert set(cfg.model) == set(names)
        assert cfg.model.preset == preset and (
            widths is None and cfg.model.widths is None or list(cfg.model.widths) == widths)
        assert settings.model_config(cfg, num_experts=2).d_state == 16
