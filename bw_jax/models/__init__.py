"""Networks built on the layer library: EfficientNet B0–B7 with BW at the stem, MBConv blocks and head."""

from bw_jax.models.depthwise import DepthwiseConv
from bw_jax.models.efficientnet import EfficientNet

__all__ = ['DepthwiseConv', 'EfficientNet']
