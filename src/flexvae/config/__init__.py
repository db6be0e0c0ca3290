"""Run configuration: one frozen dataclass per TOML section, loaded and checked.

``schema.py`` declares the sections, ``validate.py`` checks values and names, ``load.py``
reads files and ``--set`` overrides, ``toml_io.py`` writes TOML.
"""

from .load import apply_overrides, config_from_dict, load_config, parse_override_value
from .schema import (SECTION_ORDER, SECTIONS, Config, DataConfig, EncodeConfig, LossConfig, MemConfig,
                     ModelConfig, TrainConfig)
from .toml_io import (config_to_dict, describe_fields, dump_toml, save_config, set_batch_size_text,
                      write_batch_size)

__all__ = [
    "Config", "DataConfig", "ModelConfig", "LossConfig", "TrainConfig", "EncodeConfig", "MemConfig",
    "SECTIONS", "SECTION_ORDER", "load_config", "config_from_dict", "apply_overrides", "parse_override_value",
    "config_to_dict", "dump_toml", "save_config", "describe_fields", "set_batch_size_text", "write_batch_size",
]
