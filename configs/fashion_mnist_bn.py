"""`default.py` with BatchNorm everywhere (the original EfficientNet), for comparison."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.stem_type = 1
  config.model.mbconv_type = 0
  config.model.head_type = 1
  return config
