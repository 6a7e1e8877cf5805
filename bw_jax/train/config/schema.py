"""The one table of training config keys (`KEYS`): each key's default, doc, allowed values, resume policy and
whether it is a constant of the compiled programs (`rules.Key`). Every config file starts from `get_config()`,
the table as an ml_collections tree, and overrides what differs (`configs/default.py`, your own files).

Everything else is derived from the table: `validation.validate_config` (unknown keys, values),
`checkpoints.check_resumed_config` (what a resumed run may change) and `loop.programs_key` (which keys
the compiled programs depend on). It lives in the package, not in `configs/`, so that an installed bw_jax
validates configs without the repository. Nullable keys are `FieldReference(value, field_type=...)`, so that
`--config.key=value` parses them when they are None.
"""

from typing import Any

import ml_collections
from ml_collections import FieldReference

from bw_jax.data import DATASET_NAMES, default_dataset_config
from bw_jax.models.depthwise import IMPLEMENTATIONS
from bw_jax.models.efficientnet import HEAD_TYPES, MBCONV_TYPES, STEM_TYPES, VARIANTS
from bw_jax.nn.whitening import METHODS, STAT_SOURCES
from bw_jax.train.config.rules import (BOOL, FRACTION, FROM_DATASET, Choice, InPrograms, Key, PositiveInt, Range,
                                       Resume, Text)

SAFE, ON_PURPOSE, NEVER = Resume.SAFE, Resume.ON_PURPOSE, Resume.NEVER
CONSTANT, DERIVED, OUTSIDE = InPrograms.CONSTANT, InPrograms.DERIVED, InPrograms.OUTSIDE
INF = float('inf')
POSITIVE = Range(0.0, INF, low_open=True, high_open=True)
NON_NEGATIVE = Range(0.0, INF)
OPTIMIZERS = ('sgd', 'nesterov', 'adamw', 'rmsprop_tf')
LR_SCHEDULES = ('cosine', 'exponential')

KEYS = (
    # The model (bw_jax/models/efficientnet.py): keys that change the parameters' shapes are NEVER resumed.
    Key('model.variant', 'b0', "'b0' … 'b7': width, depth and dropout of the reference scaling.",
        Choice(tuple(VARIANTS)), NEVER, CONSTANT),
    Key('model.num_classes', None, "None: the dataset's class count (a value must equal it).",
        PositiveInt(), NEVER, CONSTANT, kind=int, nullable=True),
    Key('model.stem_type', 1, '1: conv → BN; 2: depthwise → BW → conv.', Choice(STEM_TYPES), NEVER, CONSTANT),
    Key('model.mbconv_type', 0, '0: the original MBConv with BN; 1, 2, 3: BW inside the block.',
        Choice(MBCONV_TYPES), NEVER, CONSTANT),
    Key('model.head_type', 1, '1: conv → BN; 2: BW → conv.', Choice(HEAD_TYPES), NEVER, CONSTANT),
    Key('model.stem_stride', 2, '2 as published; 1 keeps the resolution of small images.', Choice((1, 2)),
        ON_PURPOSE, CONSTANT),
    Key('model.dropout_rate', None, "None: the variant's (0.2 for B0).", FRACTION, ON_PURPOSE, CONSTANT,
        kind=float, nullable=True),
    Key('model.drop_connect_rate', 0.2, 'Stochastic depth of the last block; earlier blocks scale it down.',
        FRACTION, ON_PURPOSE, CONSTANT),
    Key('model.width_multiplier', None, "None: the variant's width.", Range(0.0, INF, low_open=True), NEVER,
        CONSTANT, kind=float, nullable=True),
    Key('model.depth_multiplier', None, "None: the variant's depth.", Range(0.0, INF, low_open=True), NEVER,
        CONSTANT, kind=float, nullable=True),
    Key('model.depthwise_implementation', 'auto', "'auto' (at lowering: shift on CPU, XLA elsewhere), 'shift', "
        "'xla'.", Choice(IMPLEMENTATIONS), ON_PURPOSE, CONSTANT),
    # Every BW layer's settings (bw_jax/nn/whitening.py, BWSettings).
    Key('model.bw.method', 'cholesky', "How S is computed from Σ + ε·I.", Choice(METHODS), ON_PURPOSE, CONSTANT),
    Key('model.bw.group_size', 16, 'Channels per group; None whitens all together.', PositiveInt(), NEVER,
        CONSTANT, kind=int, nullable=True),
    Key('model.bw.momentum', 0.99, 'Running statistics: stat ← momentum·stat + (1 − momentum)·batch_stat.',
        Range(0.0, 1.0), ON_PURPOSE, CONSTANT),
    Key('model.bw.epsilon', 1e-3, 'Ridge ε on the covariance diagonal; raise it if layers go singular.', POSITIVE,
        ON_PURPOSE, CONSTANT),
    Key('model.bw.center_with', 'batch', "'batch' or 'running' mean for centring training inputs.",
        Choice(STAT_SOURCES), ON_PURPOSE, CONSTANT),
    Key('model.bw.whiten_with', 'batch', "'batch' or 'running' covariance for the training whitening matrix.",
        Choice(STAT_SOURCES), ON_PURPOSE, CONSTANT),
    Key('model.bw.newton_iterations', 5, "Newton–Schulz steps for method='newton'.", PositiveInt(), ON_PURPOSE,
        CONSTANT),
    # The data (bw_jax/data/__init__.py documents the keys; defaults are the dataset's).
    Key('dataset.name', 'fashion_mnist', 'The dataset: its classes, channels and normalisation.',
        Choice(DATASET_NAMES), NEVER, CONSTANT),
    Key('dataset.data_dir', FROM_DATASET, "Where to look first for the data (None: the dataset's places).",
        Text('the dataset module'), SAFE, OUTSIDE, kind=str, nullable=True),
    Key('dataset.image_size', FROM_DATASET, 'Side S of the square images fed to the model.',
        Range(1, INF, integer=True), ON_PURPOSE, CONSTANT),
    Key('dataset.train_split', FROM_DATASET, "Split to train on ('train', or a TFDS slice 'train[:90%]').",
        Text('the dataset module'), ON_PURPOSE, OUTSIDE),
    Key('dataset.eval_split', FROM_DATASET, 'Split to evaluate on, covered exactly once per evaluation.',
        Text('the dataset module'), ON_PURPOSE, OUTSIDE),
    Key('dataset.shuffle_buffer', FROM_DATASET, 'Training shuffle buffer, in examples per host.', PositiveInt(),
        ON_PURPOSE, OUTSIDE),
    Key('dataset.augment.random_crop', FROM_DATASET, 'Crop S × S at a random offset of the padded image.', BOOL,
        ON_PURPOSE, OUTSIDE),
    Key('dataset.augment.crop_padding', FROM_DATASET, 'That padding, in pixels.', Range(0, INF, integer=True),
        ON_PURPOSE, OUTSIDE),
    Key('dataset.augment.flip', FROM_DATASET, 'Random horizontal flip.', BOOL, ON_PURPOSE, OUTSIDE),
    # Batches and the run's length.
    Key('batch_size', 256, 'Global batch over all devices and hosts (None when batch_size_per_device is set).',
        PositiveInt(), ON_PURPOSE, DERIVED, kind=int, nullable=True, ignored_when='batch_size_per_device'),
    Key('batch_size_per_device', None, 'Set: the global batch is this × jax.device_count() when training starts.',
        PositiveInt(), ON_PURPOSE, DERIVED, kind=int, nullable=True),
    Key('eval_batch_size', None, 'None: the global training batch. Eval covers the split.', PositiveInt(), SAFE,
        OUTSIDE, kind=int, nullable=True),
    Key('num_epochs', 10.0, 'Training length in epochs of the train split, unless num_train_steps > 0.',
        Range(0.0, INF, low_open=True), SAFE, DERIVED),
    Key('num_train_steps', -1, '> 0: train exactly this many steps (overrides num_epochs).', PositiveInt(), SAFE,
        DERIVED, off=(-1, 'to train for num_epochs')),
    # The optimizer and its schedule (bw_jax/train/optim.py).
    Key('optimizer', 'nesterov', "'sgd', 'nesterov', 'adamw' or 'rmsprop_tf' (TF1 RMSProp, EfficientNet's).",
        Choice(OPTIMIZERS), NEVER, CONSTANT),
    Key('momentum', 0.9, "Momentum of sgd / nesterov / rmsprop_tf; adamw's b1.", FRACTION, ON_PURPOSE, CONSTANT),
    Key('learning_rate', 0.1, 'Per 256 images: the peak rate is learning_rate · global batch / 256.', POSITIVE,
        ON_PURPOSE, OUTSIDE),
    Key('lr_schedule', 'cosine', "'cosine' (to 0 at the last step) or 'exponential' (staircase).",
        Choice(LR_SCHEDULES), ON_PURPOSE, DERIVED),
    Key('warmup_epochs', 1.0, 'Linear warm-up from 0 to the peak rate, in epochs of the split read.', NON_NEGATIVE,
        ON_PURPOSE, DERIVED),
    Key('warmup_fraction', None, 'Set: the warm-up as this share of the run (a 10-epoch sweep trial warms up for '
        'the same share as the 30-epoch run); overrides warmup_epochs.', FRACTION, ON_PURPOSE, DERIVED,
        kind=float, nullable=True),
    Key('decay_rate', 0.97, "'exponential': multiply the rate by this …", Range(0.0, 1.0, low_open=True),
        ON_PURPOSE, DERIVED),
    Key('decay_epochs', 2.4, '… every this many epochs after warm-up.', Range(0.0, INF, low_open=True), ON_PURPOSE,
        DERIVED),
    Key('weight_decay', 5e-5, 'On conv / dense kernels only (not normalisation parameters nor biases).',
        NON_NEGATIVE, ON_PURPOSE, OUTSIDE),
    Key('label_smoothing', 0.1, 'Cross-entropy targets (1 − s)·one_hot + s / num_classes.', FRACTION, ON_PURPOSE,
        CONSTANT),
    Key('ema_decay', 0.0, 'Exponential moving average of the weights, used for eval; 0 turns it off.', FRACTION,
        NEVER, CONSTANT),
    # JAX keys take 32 bits of the seed: a larger one would silently repeat another seed's parameters.
    Key('seed', 0, 'Parameters, dropout and the data order.', Range(-2**31, 2**31 - 1, integer=True), ON_PURPOSE,
        OUTSIDE),
    # Start a fresh run from a trained network (bw_jax/train/init_from.py); a resumed run starts from its
    # checkpoint and ignores both.
    Key('init_from', '', "A Keras EfficientNet .h5 file, a folder written by `python -m bw_jax.convert`, or a run's "
        "workdir; BN placements this model puts BW in are converted. '': the seed's initialisation.",
        Text('init_from.check_source'), SAFE, OUTSIDE),
    Key('init_calibration_batches', 20, 'Train-split batches that calibrate BN and BW statistics after init_from.',
        Range(0, INF, integer=True), SAFE, OUTSIDE),
    Key('half_precision', False, 'bfloat16 activations; parameters and statistics stay float32.', BOOL,
        ON_PURPOSE, CONSTANT),
    Key('print_memory', False, "Print the compiled train step's memory analysis before training.", BOOL, SAFE,
        OUTSIDE),
    # What the run shows and keeps.
    Key('log_every_steps', 100, 'Console progress line and TensorBoard train metrics (means over the window).',
        PositiveInt(), SAFE, OUTSIDE),
    Key('eval_every_steps', -1, 'Eval over the whole eval split every this many steps.', PositiveInt(), SAFE,
        OUTSIDE, off=(-1, 'for once per epoch')),
    Key('checkpoint_every_steps', 1000, 'Checkpoint period; a checkpoint is also written at the end.',
        PositiveInt(), SAFE, OUTSIDE),
    Key('bw_max_fallbacks', -1, 'Stop the run (after its eval) when the BW fallbacks summed over layers exceed '
        'this. Each eval line shows the fallbacks and the worst condition number.', Range(0, INF, integer=True),
        SAFE, OUTSIDE, off=(-1, 'for no limit')),
    Key('keep_checkpoints', 2, 'How many of the latest checkpoints to keep in workdir/checkpoints.',
        PositiveInt(), SAFE, OUTSIDE),
    Key('resume_allow_changes', '', "Comma-separated dotted keys a resumed run may change on purpose (e.g. "
        "'batch_size,learning_rate'); a resume stops on any other difference from workdir/checkpoints/config.json "
        'but in the SAFE keys. Keys that change the parameters\' shapes are refused.', Text('the key table'),
        SAFE, OUTSIDE),
)
KEY_TABLE: dict[str, Key] = {key.name: key for key in KEYS}


def keys_where(**fields: Any) -> tuple[str, ...]:
  """The names of the keys whose fields have the given values, e.g. `keys_where(resume=Resume.SAFE)`."""
  return tuple(k.name for k in KEYS if all(getattr(k, f) == v for f, v in fields.items()))


def schema_value(key: Key) -> Any:
  return FieldReference(key.default, field_type=key.kind) if key.nullable else key.default


def get_config() -> ml_collections.ConfigDict:
  """Every training config key with its default, as an ml_collections tree (the table's)."""
  config = ml_collections.ConfigDict()
  config.dataset = default_dataset_config('fashion_mnist')
  for key in KEYS:
    *groups, leaf = key.name.split('.')
    node = config
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    if key.default is not FROM_DATASET:
      node[leaf] = schema_value(key)
  return config
