"""Networks built on the layer library: EfficientNet B0–B7 with BW at the stem, MBConv blocks and head; the
path from a pretrained network (Keras or timm weights in, BN → BW conversion, calibration, folding, export)."""

from bw_jax.models.depthwise import DepthwiseConv
from bw_jax.models.efficientnet import EfficientNet
from bw_jax.models.fold import fold_for_inference
from bw_jax.models.keras_import import from_keras
from bw_jax.models.pretrained import Pretrained
from bw_jax.models.timm_import import from_timm

__all__ = ['DepthwiseConv', 'EfficientNet', 'Pretrained', 'fold_for_inference', 'from_keras', 'from_timm']
