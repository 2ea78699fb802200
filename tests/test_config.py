"""Tier 1: job configuration from TOML files and flags (tessera.config).

Every error is a :class:`ConfigError` whose message is one line naming the field
(or the flag that set it), what was given and what is allowed.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tessera.config.load import ConfigError, config_from_dict, config_to_dict, load_config
from tessera.config.schema import JobConfig, OptimizerConfig


def write(tmp_path, text: str, name: str = "job.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    assert message.strip() == message and message
    return message


def test_unknown_field_is_named_with_allowed_fields(tmp_path):
    path = write(tmp_path, """
        [model]
        name = "mlp"
        hiden = [32]
    """)
    message = config_error(path)
    assert "model.hiden" in message
    assert "unknown field" in message
    for allowed in ("name", "hidden", "channels"):
        assert allowed in message


def test_unknown_top_level_table_lists_tables(tmp_path):
    message = config_error(write(tmp_path, """
        [clutser]
        workers = 2
    """))
    assert "clutser" in message
    for allowed in ("model", "data", "train", "optimizer", "ps", "cluster"):
        assert allowed in message


def test_wrong_type_names_field_and_types(tmp_path):
    message = config_error(write(tmp_path, """
        [data]
        batch_size = "sixteen"
    """))
    assert message.startswith("data.batch_size")
    assert "int" in message and "str" in message


def test_zero_workers_flag_is_named(tmp_path):
    path = write(tmp_path, 'name = "ok"\n')
    message = config_error(path, {"--workers": 0})
    assert "--workers" in message
    assert "cluster.workers" in message
    assert "0" in message and ">= 1" in message


def test_bad_mode_flag_lists_allowed_values(tmp_path):
    message = config_error(None, {"--mode": "eventual"})
    assert "--mode" in message
    assert "eventual" in message
    assert "'sync'" in message and "'async'" in message


def test_flag_with_wrong_type(tmp_path):
    message = config_error(None, {"--batch-size": "3"})
    assert "--batch-size" in message and "int" in message


def test_nesterov_without_momentum(tmp_path):
    message = config_error(write(tmp_path, """
        [optimizer]
        name = "sgd"
        nesterov = true
    """))
    assert message.startswith("optimizer")
    assert "nesterov" in message and "momentum" in message


def test_npy_without_path(tmp_path):
    message = config_error(write(tmp_path, """
        [data]
        dataset = "npy"
    """))
    assert "data.path" in message


def test_bad_enum_in_file_lists_allowed_values(tmp_path):
    message = config_error(write(tmp_path, """
        [optimizer]
        name = "lamb"
    """))
    assert message.startswith("optimizer.name")
    for allowed in ("'sgd'", "'adam'", "'adamw'", "'adagrad'"):
        assert allowed in message


def test_missing_file_and_invalid_toml(tmp_path):
    message = config_error(tmp_path / "nope.toml")
    assert "nope.toml" in message and "does not exist" in message
    message = config_error(write(tmp_path, "[model\nname = 1\n", "broken.toml"))
    assert "broken.toml" in message and "TOML" in message


def test_flags_override_file(tmp_path):
    path = write(tmp_path, """
        [cluster]
        workers = 3
        [ps]
        mode = "sync"
    """, "digits.toml")
    cfg = load_config(path, {"--workers": 5, "--mode": "async", "--steps": None})
    assert cfg.cluster.workers == 5
    assert cfg.ps.mode == "async"
    assert cfg.name == "digits"  # the job name defaults to the file's stem
    assert cfg.train.steps is None and cfg.train.epochs == 1


def test_valid_file_round_trips(tmp_path):
    path = write(tmp_path, """
        name = "roundtrip"
        [model]
        name = "cnn"
        channels = [8, 16]
        [data]
        dataset = "npy"
        path = "memory://shards"
        batch_size = 7
        test_fraction = 0.25
        [train]
        steps = 11
        seed = 3
        [optimizer]
        name = "sgd"
        lr = 0.1
        momentum = 0.9
        nesterov = true
        weight_decay = 0.001
        betas = [0.8, 0.99]
        [ps]
        mode = "async"
        partition_mb = 0.5
        [cluster]
        workers = 3
        servers = 2
        timeout_s = 5.0
    """)
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.model.channels == [8, 16] and cfg.data.path == "memory://shards"
    assert cfg.optimizer.betas == (0.8, 0.99)
    raw = config_to_dict(cfg)
    # Role processes receive it as JSON: it must survive that too.
    again = config_from_dict(json.loads(json.dumps(raw)))
    assert again == cfg
    assert config_to_dict(again) == raw
    assert isinstance(again.optimizer, OptimizerConfig)
    assert again.optimizer.torch_kwargs() == cfg.optimizer.torch_kwargs()


def test_config_from_dict_rejects_unknown_field():
    raw = config_to_dict(load_config(None))
    raw["ps"]["modde"] = "sync"
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert "ps.modde" in str(info.value) and "\n" not in str(info.value)


def test_allreduce_with_servers_is_one_line_naming_the_flag(tmp_path):
    # It used to start the servers, which died with a traceback ("server mode 'allreduce'").
    path = write(tmp_path, 'name = "ok"\n[ps]\nmode = "allreduce"\n[cluster]\nservers = 2\n')
    message = config_error(path)
    assert "--servers" in message and "--servers 0" in message and "\n" not in message


@pytest.mark.parametrize("value", [50, 200_000, -1])
def test_a_scheduler_slice_outside_the_kernels_range_is_named(tmp_path, value):
    message = config_error(write(tmp_path, f"""
        [cluster]
        slice_us = {value}
    """))
    assert message.startswith("cluster") and "slice_us" in message and "100-100000" in message
