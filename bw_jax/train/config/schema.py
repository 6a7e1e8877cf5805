"""The one list of training config keys: every config file starts from `get_config()` here and overrides
what differs (`configs/default.py`, your own files).

It lives in the package, not in `configs/`, so that an installed bw_jax validates configs without the
repository. `bw_jax.train.config.validation.validate_config` rejects any key not in this tree, so a misspelt override fails
before anything compiles. Optional values use `FieldReference(None, field_type=...)` so that
`--config.key=value` still works on the command line.
"""

import ml_collections
from ml_collections import FieldReference

from bw_jax.data import default_dataset_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  model = config.model = ml_collections.ConfigDict()
  model.variant = 'b0'  # 'b0' … 'b7': width, depth and dropout of the reference scaling.
  model.num_classes = FieldReference(None, field_type=int)  # None: the dataset's class count.
  model.stem_type = 1  # 1: conv → BN; 2: depthwise → BW → conv (bw_jax/models/efficientnet.py).
  model.mbconv_type = 0  # 0: the original MBConv with BN; 1, 2, 3: BW inside the block.
  model.head_type = 1  # 1: conv → BN; 2: BW → conv.
  model.stem_stride = 2  # 2 as published; 1 keeps the resolution of small images.
  model.dropout_rate = FieldReference(None, field_type=float)  # None: the variant's (0.2 for B0).
  model.drop_connect_rate = 0.2  # Stochastic depth of the last block; earlier blocks scale it down.
  model.width_multiplier = FieldReference(None, field_type=float)  # None: the variant's width.
  model.depth_multiplier = FieldReference(None, field_type=float)  # None: the variant's depth.
  model.depthwise_implementation = 'auto'  # 'auto' (at lowering: shift on CPU, XLA elsewhere), 'shift', 'xla'.

  bw = model.bw = ml_collections.ConfigDict()  # Every BW layer's settings (whitening.BWSettings names).
  bw.method = 'cholesky'  # 'cholesky', 'zca', 'pca' or 'newton': how S is computed from Σ + ε·I.
  bw.group_size = FieldReference(16, field_type=int)  # Channels per group; None whitens all together.
  bw.momentum = 0.99  # Running statistics: stat ← momentum·stat + (1 − momentum)·batch_stat.
  bw.epsilon = 1e-3  # Ridge ε on the covariance diagonal; raise it if layers go singular.
  bw.center_with = 'batch'  # 'batch' or 'running' mean for centring training inputs.
  bw.whiten_with = 'batch'  # 'batch' or 'running' covariance for the training whitening matrix.
  bw.newton_iterations = 5  # Newton–Schulz steps for method='newton'.

  config.dataset = default_dataset_config('fashion_mnist')  # Keys: bw_jax/data/__init__.py.

  config.batch_size = 256  # Global batch over all devices and hosts.
  # Set: the global batch is this × jax.device_count() when training starts (batch_size is then ignored).
  config.batch_size_per_device = FieldReference(None, field_type=int)
  config.eval_batch_size = FieldReference(None, field_type=int)  # None: batch_size. Eval covers the split.
  config.num_epochs = 10.0  # Training length in epochs of the train split, unless num_train_steps > 0.
  config.num_train_steps = -1  # > 0: train exactly this many steps (overrides num_epochs); -1: epochs.

  config.optimizer = 'nesterov'  # 'sgd', 'nesterov', 'adamw' or 'rmsprop_tf' (TF1 RMSProp, EfficientNet).
  config.momentum = 0.9  # Momentum of sgd / nesterov / rmsprop_tf; adamw's b1.
  config.learning_rate = 0.1  # Per 256 images: the peak rate is learning_rate · batch_size / 256.
  config.lr_schedule = 'cosine'  # 'cosine' (to 0 at the last step) or 'exponential' (staircase).
  config.warmup_epochs = 1.0  # Linear warm-up from 0 to the peak rate, in epochs of the split read …
  # … or, when set, as this fraction of the run's steps: a schedule relative to the run that happens (a sweep
  # trial of 10 epochs warms up for the same share as the full run of 30). Overrides warmup_epochs.
  config.warmup_fraction = FieldReference(None, field_type=float)
  config.decay_rate = 0.97  # 'exponential': multiply the rate by this …
  config.decay_epochs = 2.4  # … every this many epochs after warm-up.
  config.weight_decay = 5e-5  # On conv / dense kernels only (not normalisation parameters nor biases).
  config.label_smoothing = 0.1  # Cross-entropy targets (1 − s)·one_hot + s / num_classes.
  config.ema_decay = 0.0  # Exponential moving average of the weights, used for eval; 0 turns it off.

  config.seed = 0  # Parameters, dropout and the data order.
  # Start a fresh run from a trained network (a resumed run ignores it): a Keras EfficientNet .h5 file, a folder
  # written by `python -m bw_jax.convert`, or a run's workdir; BN placements this model puts BW in are converted
  # (bw_jax/train/init_from.py). '': the seed's initialisation.
  config.init_from = ''
  config.init_calibration_batches = 20  # Train-split batches that calibrate BN and BW statistics after init_from.
  config.half_precision = False  # bfloat16 activations; parameters and statistics stay float32.
  config.print_memory = False  # Print the compiled train step's memory analysis before training.

  config.log_every_steps = 100  # Console progress line and TensorBoard train metrics.
  config.eval_every_steps = -1  # Eval over the whole eval split every this many steps; -1: each epoch.
  config.checkpoint_every_steps = 1000  # Checkpoint period; a checkpoint is also written at the end.
  # Stop the run (after its eval) when the BW fallbacks summed over layers exceed this; -1: never. Each eval
  # line shows the fallbacks and the worst condition number, and warns when the fallbacks grow.
  config.bw_max_fallbacks = -1
  config.keep_checkpoints = 2  # How many of the latest checkpoints to keep in workdir/checkpoints.
  # Resuming checks the config against the checkpoints' (workdir/checkpoints/config.json) and stops on any
  # difference but in bw_jax.train.checkpoints.SAFE_TO_CHANGE (run length, intervals, data_dir) and the
  # comma-separated dotted keys named here, e.g. 'batch_size,learning_rate' to change them on purpose.
  config.resume_allow_changes = ''
  return config
