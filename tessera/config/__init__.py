"""Typed configuration (see :mod:`tessera.config.schema`)."""

from tessera.config.load import ConfigError, config_from_dict, config_to_dict, load_config
from tessera.config.schema import (AmpConfig, ClusterConfig, DataConfig, JobConfig, ModelConfig,
                                   OptimizerConfig, PSConfig, TrainConfig)

__all__ = ["ConfigError", "load_config", "config_to_dict", "config_from_dict", "JobConfig",
           "ClusterConfig", "DataConfig", "ModelConfig", "OptimizerConfig", "PSConfig",
           "TrainConfig", "AmpConfig"]
