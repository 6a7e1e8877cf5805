"""The train and eval steps and what they are made of: the model from a config, the train state, the
loss and the weight EMA. Needs JAX, Flax, Optax and ml_collections only: no input pipeline, no
checkpoints, no metric writers (what an accelerator benchmark needs of the training system)."""

from typing import Any, Callable

from flax.training import train_state
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bw_jax.models.efficientnet import EfficientNet
from bw_jax.nn.whitening import BWSettings


class TrainState(train_state.TrainState):
  """params, opt_state and step (Flax's), plus the normalisation statistics, the weight EMA and BW's
  health counters (the `bw_health` collection; {} for a model without BW)."""
  batch_stats: Any
  ema_params: Any
  bw_health: Any = flax.struct.field(default_factory=dict)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> EfficientNet:
  """The EfficientNet of `config.model` (its `num_classes` when set, else the dataset's), its BW layers
  keeping their health counters (the `bw_health` collection)."""
  fields = config.model.to_dict()
  fields['bw'] = BWSettings(**fields['bw'], track_health=True)  # the loop reports BW's health counters
  if fields['num_classes'] is None:
    fields['num_classes'] = num_classes
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  return EfficientNet(**fields, dtype=dtype)


def model_num_classes(config: ml_collections.ConfigDict, dataset_classes: int) -> int:
  """The head's class count: the prepared dataset's `dataset_classes`, which `config.model.num_classes` must
  equal when set (a 200-way head on 10 classes would train, silently, towards the wrong chance level)."""
  wanted = config.model.num_classes
  if wanted is not None and wanted != dataset_classes:
    raise ValueError(f'config.model.num_classes={wanted}, but the prepared {config.dataset.name} data has '
                     f'{dataset_classes} classes; set it to {dataset_classes} or leave it None (the data\'s).')
  return dataset_classes


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
                  ) -> jax.Array:
  """Per-example loss against smoothed one-hot targets: logits (B, K), labels (B,) -> (B,)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def update_ema(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def train_batch_spec(batch_size: int, image_shape: tuple[int, int, int], sharding: Any) -> dict:
  """Shapes of a global training batch as it reaches the step: uint8 images, int32 labels, float32 mask."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {'image': spec((batch_size, *image_shape), jnp.uint8), 'label': spec((batch_size,), jnp.int32),
          'mask': spec((batch_size,), jnp.float32)}


def train_step(state: TrainState, batch: dict, dropout_key: jax.Array, rates: dict | None = None, *,
               model: Any, num_classes: int, label_smoothing: float, ema_decay: float,
               learning_rate_fn: Callable[[Any], Any] | None = None,
               optimizer_from_rates: Callable[[dict], tuple[Any, Callable[[Any], Any]]] | None = None,
               normalise: Callable[[jax.Array], jax.Array] | None = None) -> tuple[TrainState, dict]:
  """One SGD step on a global batch {'image': (B, S, S, C), 'label': (B,)}; returns scalar metrics.

  `dropout_key` is the run's (`run_dropout_key`); the step's own is `fold_in(dropout_key, state.step)`.
  The optimizer is `state.tx` with the schedule `learning_rate_fn`; or, given `rates` (`optimizer_rates`:
  peak learning rate and weight decay), the pair `optimizer_from_rates(rates)` builds from them: the rates
  are then values rather than constants of the program, so runs that differ only in them (a sweep's
  learning rates, a comparison's tuned arms) share one compiled step.
  `normalise` turns the batch's images (uint8 pixels) into the model's input on the device; None: the
  images are the input already.
  """
  tx, learning_rate_fn = (state.tx, learning_rate_fn) if rates is None else optimizer_from_rates(rates)
  key = jax.random.fold_in(dropout_key, state.step)
  images = batch['image'] if normalise is None else normalise(batch['image'])

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats, 'bw_health': state.bw_health}
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats', 'bw_health'],
                                  rngs={'dropout': key})
    loss = jnp.mean(cross_entropy(logits, batch['label'], num_classes, label_smoothing))
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
             'learning_rate': learning_rate_fn(state.step)}
  # The state keeps its own optimizer (static): the one built from the rates only makes this update.
  state = state.replace(tx=tx).apply_gradients(grads=grads, batch_stats=updates['batch_stats'],
                                               bw_health=updates.get('bw_health', {})).replace(tx=state.tx)
  if ema_decay > 0:
    state = state.replace(ema_params=update_ema(state.ema_params, state.params, ema_decay))
  return state, metrics


def eval_step(state: TrainState, batch: dict, *, model: Any, num_classes: int, use_ema: bool,
              normalise: Callable[[jax.Array], jax.Array] | None = None) -> dict:
  """Masked sums over a padded eval batch: cross-entropy (no smoothing), correct count, example count."""
  params = state.ema_params if use_ema else state.params
  images = batch['image'] if normalise is None else normalise(batch['image'])
  logits = model.apply({'params': params, 'batch_stats': state.batch_stats}, images, train=False)
  mask = batch['mask']
  loss = cross_entropy(logits, batch['label'], num_classes, 0.0)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask)}


def run_dropout_key(seed: int, replicated: jax.sharding.Sharding) -> jax.Array:
  """The run's dropout key, `fold_in(key(seed), 1)`, as a global array replicated over the mesh.

  An argument of the train step rather than a constant bound into it: every seed of a comparison then runs
  one compiled train step (persistent cache) instead of compiling its own.
  """
  return jax.jit(lambda s: jax.random.fold_in(jax.random.key(s), 1), out_shardings=replicated)(np.int32(seed))
