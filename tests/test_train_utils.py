"""Configs, schedules, optimizers and the weight EMA of the training loop, against hand-written references."""

import functools
import glob
import math
import os

from absl import flags
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_flags

from bw_jax.train import step as train
from bw_jax.train import health as train_health, reporting
from bw_jax.train.config.validation import validate_config
from bw_jax.train.health import bw_health
from bw_jax.train.optim import create_optimizer, learning_rate_fn, optimizer_from_rates, optimizer_rates
from bw_jax.train.plan import DataCounts, plan_for
from bw_jax.train.programs import CPU_INIT_COMPILER_OPTIONS
from bw_jax.train.reporting import memory_report
from bw_jax.train.step import create_model, train_batch_spec, TrainState
from configs import imagenet, smoke, tiny_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGENET = DataCounts(train_examples=1_281_167, eval_examples=50_000, num_classes=1000)


def plan_with(config, steps_per_epoch: int, num_train_steps: int, device_count: int = 1):
  """The plan of `config` (a global batch, not per device) run for `num_train_steps` on a train split of
  `steps_per_epoch` batches."""
  config.num_train_steps = num_train_steps
  return plan_for(config, DataCounts(steps_per_epoch * config.batch_size, 1, 10), device_count)


def schedule_of(config, steps_per_epoch: int, num_train_steps: int):
  """The learning rate per step that the plan gives `config`, at its peak for the global batch."""
  plan = plan_with(config, steps_per_epoch, num_train_steps)
  return learning_rate_fn(plan.schedule, plan.peak_learning_rate)


TRAINING_CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                          if not os.path.basename(p).startswith('sweep_'))


def load_from_command_line(path: str, *overrides: str):
  """`path` parsed as `python -m bw_jax.main --config=path [overrides]` would parse it."""
  argv = ['main', f'--config={path}', *overrides]
  flag_values = flags.FlagValues()
  # config_flags finds the `--config.key` overrides in the argv it is given when the flag is defined.
  config_flags.DEFINE_config_file('config', path, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('path', TRAINING_CONFIGS, ids=os.path.basename)
def test_every_config_takes_num_train_steps_from_the_command_line(path):
  config = load_from_command_line(path, '--config.num_train_steps=7', '--config.seed=3')
  assert config.num_train_steps == 7 and config.seed == 3
  if config.init_from and not os.path.exists(config.init_from):  # A run its docstring says to make first.
    with pytest.raises(ValueError, match=rf'^config.init_from={config.init_from!r} does not exist'):
      validate_config(config)
    config.init_from = ''
  validate_config(config)


def test_imagenet_config_is_the_published_b0_recipe():
  """Tan & Le (2019) and TF's efficientnet/main.py: RMSProp(0.9, momentum 0.9, ε 1e-3), 0.016 per 256
  images, 5 warm-up epochs, ×0.97 every 2.4 epochs, EMA 0.9999, weight decay 1e-5, smoothing 0.1."""
  config = imagenet.get_config()
  validate_config(config)
  plan = plan_for(config, IMAGENET, device_count=16)  # The published 16 TPU cores.
  assert (config.model.variant, config.dataset.name, config.dataset.image_size) == ('b0', 'imagenet2012', 224)
  assert (plan.global_batch, config.num_epochs, config.optimizer) == (2048, 350.0, 'rmsprop_tf')
  assert plan.peak_learning_rate == pytest.approx(0.128)
  assert (config.ema_decay, config.weight_decay, config.label_smoothing) == (0.9999, 1e-5, 0.1)
  steps_per_epoch = 1_281_167 // 2048
  assert (plan.steps_per_epoch, plan.num_train_steps) == (steps_per_epoch, 350 * steps_per_epoch)
  schedule = learning_rate_fn(plan.schedule, plan.peak_learning_rate)
  warmup = 5 * steps_per_epoch
  decay_steps = round(2.4 * steps_per_epoch)
  for step in (0, 1, warmup // 2, warmup - 1):
    assert schedule(step) == pytest.approx(0.128 * step / warmup, rel=1e-5, abs=1e-8)
  for after in (0, decay_steps - 1, decay_steps, 10 * decay_steps + 7):
    assert schedule(warmup + after) == pytest.approx(0.128 * 0.97 ** (after // decay_steps), rel=1e-5)


@pytest.mark.parametrize('overrides, size', [
    ((), 224),
    (('--config.model.variant=b3',), 300),  # Tan & Le (2019), Table 1 / TF efficientnet_builder.py.
    (('--config.model.variant=b7',), 600),
    (('--config.model.variant=b3', '--config.dataset.image_size=256'), 256),
    (('--config.dataset.image_size=128', '--config.model.variant=b5'), 128),
])
def test_imagenet_image_size_follows_the_variant_unless_set(overrides, size):
  config = load_from_command_line(os.path.join(REPO, 'configs', 'imagenet.py'), *overrides)
  assert config.dataset.image_size == size


def test_an_unknown_variant_is_named_with_the_allowed_ones():
  config = load_from_command_line(os.path.join(REPO, 'configs', 'imagenet.py'), '--config.model.variant=b9')
  with pytest.raises(ValueError, match="variant='b9' is not supported; choose one of 'b0', 'b1'"):
    validate_config(config)


@pytest.mark.parametrize('module, per_device, lr_per_256', [(imagenet, 128, 0.016), (tiny_imagenet, 256, 0.2)])
@pytest.mark.parametrize('devices', [1, 8])
def test_accelerator_configs_scale_batch_and_learning_rate_with_the_device_count(module, per_device,
                                                                                 lr_per_256, devices):
  config = module.get_config()
  plan = plan_for(config, IMAGENET, device_count=devices)
  assert plan.global_batch == plan.record()['batch_size'] == per_device * devices
  assert plan.peak_learning_rate == pytest.approx(lr_per_256 * per_device * devices / 256)
  assert plan.steps_per_epoch == 1_281_167 // (per_device * devices)
  assert config.batch_size is None and config.batch_size_per_device == per_device  # Left as it was.


def test_batch_size_per_device_must_be_positive():
  config = smoke.get_config()
  config.batch_size, config.batch_size_per_device = None, 0
  with pytest.raises(ValueError, match=r'config.batch_size_per_device=0 must be a positive integer'):
    validate_config(config)
  config.batch_size_per_device = None
  with pytest.raises(ValueError, match=r'config.batch_size is None and batch_size_per_device is not set'):
    validate_config(config)
  config.batch_size = 16
  assert plan_for(config, IMAGENET, device_count=8).global_batch == 16  # Unset: batch_size is global.


def test_cosine_schedule_with_warmup_matches_its_formula():
  config = smoke.get_config()
  config.lr_schedule, config.warmup_epochs, config.learning_rate, config.batch_size = 'cosine', 2.0, 0.4, 128
  steps_per_epoch, total = 10, 50
  schedule = schedule_of(config, steps_per_epoch, total)
  peak, warmup = 0.4 * 128 / 256, 20
  for step in range(total + 1):
    expected = (peak * step / warmup if step < warmup
                else peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
    assert schedule(step) == pytest.approx(expected, abs=1e-7), step


def test_warmup_fraction_is_a_share_of_the_run_whatever_the_epoch_length():
  config = smoke.get_config()
  config.lr_schedule, config.learning_rate, config.batch_size = 'cosine', 0.4, 128
  config.warmup_epochs, config.warmup_fraction = 3.0, 0.25  # The fraction wins: 10 of 40 steps.
  peak, warmup, total = 0.2, 10, 40
  for steps_per_epoch in (7, 3125):
    schedule = schedule_of(config, steps_per_epoch, total)
    for step in range(total + 1):
      expected = (peak * step / warmup if step < warmup
                  else peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
      assert schedule(step) == pytest.approx(expected, abs=1e-7), (steps_per_epoch, step)


def test_schedule_problems_name_a_warmup_or_decay_that_cannot_complete():
  config = smoke.get_config()
  config.lr_schedule, config.warmup_epochs = 'cosine', 2.0
  problems = lambda steps_per_epoch, total: plan_with(config, steps_per_epoch, total).problems()
  # 2 warm-up epochs of 3125 steps (100,000 images at batch 32) in a 20-step trial.
  [problem] = problems(3125, 20)
  assert problem.startswith('the warm-up (warmup_epochs=2.0: 6250 steps) does not finish within the 20 steps '
                            '(3125 per epoch)')
  assert problems(9, 20) == []  # 18 steps of warm-up, then 2 of cosine.
  assert problems(10, 20) != []  # 20 steps of warm-up: the peak is never reached.
  config.warmup_fraction = 0.1
  assert problems(3125, 20) == []
  config.lr_schedule, config.decay_epochs = 'exponential', 0.01  # Every 31 steps; 18 follow the warm-up.
  [problem] = problems(3125, 20)
  assert "decays every 31 steps (decay_epochs=0.01), but only 18 of the 20 steps" in problem
  assert problems(1800, 20) == []  # Every 18 steps: one decay.


def test_images_per_second_leave_out_the_first_step_and_its_compile(monkeypatch):
  clock = iter([100.0, 160.0, 162.0, 163.0])  # Start; step 1 done (60 s of compile); step 11; step 21.
  monkeypatch.setattr(reporting.time, 'perf_counter', lambda: next(clock))
  progress = reporting.Progress(num_train_steps=31, steps_per_epoch=10, batch_size=8, start_step=0)
  assert progress.first_step_done(1) == ('first step done in 0:01:00 (compiling included); images/s count '
                                         'from here')
  metrics = {'loss': 1.0, 'accuracy': 0.5, 'learning_rate': 0.1}
  assert progress.line(11, metrics).endswith('  40 images/s  ETA 0:00:04')  # 10 steps of 8 in 2 s; 20 to go.
  assert progress.line(21, metrics).endswith('  80 images/s  ETA 0:00:01')


def _params_and_grads(seed):
  rng = np.random.default_rng(seed)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)), 'bias': rng.normal(size=(4,))},
            'norm': {'scale': rng.normal(size=(4,))}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(3)]
  return params, grads


def _run_optimizer(config, params, grads):
  tx = create_optimizer(config, lambda step: config.learning_rate * config.batch_size / 256, config.weight_decay)
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _is_kernel(path):
  return path[-1].key == 'kernel'


@pytest.mark.parametrize('optimizer', ['rmsprop_tf', 'adamw', 'nesterov'])
def test_optimizer_matches_a_numpy_reference(optimizer):
  """Three steps against the update rules written out in float64 NumPy (TF1 RMSProp: the squared-gradient
  average starts at 1 and ε is inside the root; adamw: decoupled decay; L2 decay on kernels only)."""
  jax.config.update('jax_enable_x64', True)
  try:
    config = smoke.get_config()
    config.optimizer, config.momentum, config.weight_decay = optimizer, 0.9, 0.1
    config.learning_rate, config.batch_size = 0.02, 256
    params, grads = _params_and_grads(0)
    got = _run_optimizer(config, params, grads)
  finally:
    jax.config.update('jax_enable_x64', False)
  lr, wd, mu = 0.02, 0.1, 0.9

  def reference(path, p, *gs):
    decayed = _is_kernel(path)
    p = p.copy()
    m, v, ms, mom = np.zeros_like(p), np.zeros_like(p), np.ones_like(p), np.zeros_like(p)
    for t, g in enumerate(gs, start=1):
      if optimizer == 'adamw':
        m, v = mu * m + (1 - mu) * g, 0.999 * v + 0.001 * g * g
        step = (m / (1 - mu ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        p = p - lr * (step + (wd * p if decayed else 0))
        continue
      g = g + (wd * p if decayed else 0)
      if optimizer == 'rmsprop_tf':
        ms = 0.9 * ms + 0.1 * g * g
        mom = mu * mom + lr * g / np.sqrt(ms + 1e-3)
        p = p - mom
      else:  # Nesterov as optax (and PyTorch) write it: p -= lr·(g + μ·v) with v ← μ·v + g.
        mom = mu * mom + g
        p = p - lr * (g + mu * mom)
    return p

  expected = jax.tree_util.tree_map_with_path(reference, params, *grads)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-12, err_msg=jax.tree_util.keystr(path))


class TinyNet(nn.Module):
  """A network for the training-step tests whose subject is not the network (the weight EMA, the memory
  report): a strided conv, BatchNorm (running statistics), dropout and a classifier; compiles in a second,
  where the smoke EfficientNet's init, step and eval take ~40 s."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(8, (3, 3), strides=2)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


@pytest.fixture(scope='module')
def tiny_step():
  """TinyNet, its initial state, and a jitted train step with EMA 0.5, on 3 random batches of 16 images."""
  config = smoke.get_config()
  config.ema_decay, config.num_train_steps = 0.5, 3
  model = TinyNet()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=(3, 16))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  rate_fn = schedule_of(config, 100, 3)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            tx=create_optimizer(config, rate_fn, config.weight_decay),
                            batch_stats=variables['batch_stats'], ema_params=variables['params'])
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, learning_rate_fn=rate_fn,
                                               num_classes=10, label_smoothing=0.1, ema_decay=0.5,
                                               dropout_key=jax.random.key(1)))
  return model, state, step, images, labels


def test_weight_ema_is_the_hand_computed_average(tiny_step):
  model, state, step, images, labels = tiny_step
  history = [state.params]
  for i in range(3):
    state, _ = step(state, {'image': images[i], 'label': labels[i]})
    history.append(state.params)
  # ema_t = 0.5·ema_{t−1} + 0.5·params_t from ema_0 = params_0: weights 1/8, 1/8, 1/4, 1/2.
  expected = jax.tree.map(lambda p0, p1, p2, p3: (p0 + p1 + 2 * p2 + 4 * p3) / 8, *history)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])
  # Eval with EMA uses the EMA weights: the summed loss equals the one of a model holding them.
  batch = {'image': images[0], 'label': labels[0], 'mask': np.ones(16, np.float32)}
  eval_step = jax.jit(functools.partial(train.eval_step, model=model, num_classes=10),
                      static_argnames='use_ema')
  with_ema = eval_step(state, batch, use_ema=True)
  swapped = eval_step(state.replace(params=state.ema_params), batch, use_ema=False)
  np.testing.assert_allclose(with_ema['loss'], swapped['loss'], rtol=1e-6)


# sgd is nesterov's code without the look-ahead; rmsprop_tf applies the rate before its momentum.
@pytest.mark.parametrize('optimizer, schedule', [('nesterov', 'exponential'), ('adamw', 'cosine'),
                                                 ('rmsprop_tf', 'cosine')])
def test_one_compiled_step_serves_every_seed_and_rate_with_the_results_of_constants(optimizer, schedule,
                                                                                     tiny_step):
  """train_and_evaluate passes the dropout key and the optimizer's rates (peak learning rate, weight decay:
  optimizer_rates) as arguments of the step: one compiled step serves two seeds and two learning rates, and
  3 steps (warm-up, then the decay) equal, bit for bit, those of a step with the key and the rates compiled
  in (state.tx and its schedule, the form before); another seed or rate changes the result."""
  model, initial, _, images, labels = tiny_step
  config = smoke.get_config()
  config.optimizer, config.lr_schedule, config.warmup_fraction, config.decay_epochs = optimizer, schedule, 0.34, 0.01
  config.weight_decay = 1e-2  # Large enough to show in 3 steps.
  plan = plan_with(config, 100, 3)  # 1 step of warm-up, then a cosine of 2 or a staircase of 1.
  settings = dict(model=model, num_classes=10, label_smoothing=0.1, ema_decay=0.0)
  with_arguments = jax.jit(functools.partial(train.train_step, **settings, optimizer_from_rates=functools.partial(
      optimizer_from_rates, config, plan.schedule)))
  schedule_fn = learning_rate_fn(plan.schedule, plan.peak_learning_rate)
  # One state for every run (its optimizer, static, is part of the step's signature; only its structure
  # matters to the step with rates), with a strongly typed step as train_and_evaluate's.
  state = TrainState.create(apply_fn=model.apply, params=initial.params, batch_stats=initial.batch_stats,
                            tx=create_optimizer(config, schedule_fn, config.weight_decay), ema_params={})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.device_put(state.replace(step=jnp.asarray(0, jnp.int32)), device)  # Committed, as its outputs.
  batches = [{'image': images[i], 'label': labels[i]} for i in range(3)]

  def three_steps(step, *arguments):
    current, rates = state, []
    for batch in batches:
      current, metrics = step(current, batch, *arguments)
      rates.append(float(metrics['learning_rate']))
    return jax.tree.leaves((current.params, current.opt_state)), rates

  constants = jax.jit(functools.partial(train.train_step, **settings, learning_rate_fn=schedule_fn,
                                        dropout_key=jax.random.fold_in(jax.random.key(0), 1)))
  expected, expected_rates = three_steps(constants)
  rates = optimizer_rates(plan.peak_learning_rate, config.weight_decay)
  actual, actual_rates = three_steps(with_arguments, train.run_dropout_key(0, device), rates)
  assert actual_rates == expected_rates and expected_rates[1] > 0
  for a, b in zip(actual, expected):
    np.testing.assert_array_equal(a, b)
  for seed, learning_rate in ((1, config.learning_rate), (0, 3 * config.learning_rate)):
    other = config.copy_and_resolve_references()
    other.learning_rate = learning_rate
    other_plan = plan_with(other, 100, 3)
    leaves, rates = three_steps(with_arguments, train.run_dropout_key(seed, device),
                                optimizer_rates(other_plan.peak_learning_rate, other.weight_decay))
    assert rates == [float(learning_rate_fn(other_plan.schedule, other_plan.peak_learning_rate)(i)) for i in range(3)]
    assert not all(np.array_equal(a, b) for a, b in zip(leaves, expected)), (seed, learning_rate)
  assert with_arguments._cache_size() == 1


@pytest.mark.slow  # Compiles and runs training steps of the smoke model.
def test_half_precision_keeps_float32_parameters_and_statistics():
  """bf16 activations with float32 parameters and BW/BN statistics, tracking the float32 model's logits."""
  config = smoke.get_config()
  config.model.stem_type, config.model.mbconv_type, config.model.head_type = 1, 2, 1
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 28, 28, 1)), jnp.float32)
  # One set of initial variables for both models (jitted, at train_and_evaluate's LLVM -O1 for its init:
  # an eager init of this model takes ~a minute); the bf16 model's own init is only traced (eval_shape) to
  # check that it makes the same float32 variables.
  config.half_precision = False
  init = jax.jit(functools.partial(create_model(config, 10).init, train=False))
  variables = init.lower(jax.random.key(0), x[:1]).compile(CPU_INIT_COMPILER_OPTIONS)(jax.random.key(0),
                                                                                           x[:1])
  logits = {}
  for half in (False, True):
    config.half_precision = half
    model = create_model(config, 10)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x[:1])
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    for leaf in jax.tree.leaves(shapes):
      assert leaf.dtype == jnp.float32
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats', 'bw_health']))
    logits[half], updates = apply(variables, x, rngs={'dropout': jax.random.key(1)})
    assert logits[half].dtype == jnp.float32 and np.all(np.isfinite(logits[half]))
    # The updated statistics and BW's health counters (a collection of their own) stay float32 too.
    assert updates['bw_health'] and set(updates) == {'batch_stats', 'bw_health'}
    for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
      assert leaf.dtype == jnp.float32, jax.tree_util.keystr(path)
  # The activations were bf16 (the logits differ from float32's) yet track the float32 model.
  full, half = np.asarray(logits[False], np.float32), np.asarray(logits[True], np.float32)
  # Measured 0.099 at this random initialisation on Gaussian inputs (bf16 keeps 8 bits of mantissa through
  # ~15 layers); a wrong cast (e.g. bf16 statistics) or a float32-only path would leave this window.
  relative_error = np.linalg.norm(half - full) / np.linalg.norm(full)
  assert 0 < relative_error <= 0.15, relative_error


def test_print_memory_reports_xla_memory_analysis_of_a_train_step(tiny_step):
  # The schema has the key; the report's numbers are the compiled step's, and its arguments are exactly
  # the state plus the batch (bytes counted here from the shapes).
  config = smoke.get_config()
  config.print_memory = True
  validate_config(config)
  model, state, _, _, _ = tiny_step
  step = jax.jit(functools.partial(train.train_step, model=model, learning_rate_fn=optax.constant_schedule(0.1),
                                   num_classes=10, label_smoothing=0.1, ema_decay=0.5,
                                   dropout_key=jax.random.key(1)), donate_argnums=0)
  spec = train_batch_spec(16, (28, 28, 1), None)
  compiled = step.lower(state, spec).compile()
  report = memory_report(compiled)
  analysis = compiled.memory_analysis()
  state_bytes = sum(jnp.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))  # step: a Python int
  batch_bytes = 16 * 28 * 28 * 1 + 16 * 4  # uint8 images, int32 labels (the unused mask is pruned by jit)
  assert analysis.argument_size_in_bytes == state_bytes + batch_bytes
  assert analysis.alias_size_in_bytes > 0  # The donated state is updated in place.
  gib = lambda n: f'{n / 2**30:.3f} GiB'
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
          + analysis.temp_size_in_bytes)
  assert report == (f'train step memory per device: arguments {gib(analysis.argument_size_in_bytes)}, '
                    f'outputs {gib(analysis.output_size_in_bytes)}, aliased {gib(analysis.alias_size_in_bytes)}, '
                    f'temporaries {gib(analysis.temp_size_in_bytes)}, '
                    f'code {gib(analysis.generated_code_size_in_bytes)}, peak estimate {gib(peak)}')


def test_bw_health_reads_conditions_from_batch_stats_and_counters_from_their_collection():
  cov = np.stack([np.diag([1.0, 4.0]), np.array([[2.0, 1.0], [1.0, 2.0]])])  # condition numbers 4 and 3
  batch_stats = {'stem_bw': {'mean': np.zeros(4), 'cov': cov, 'whitening': cov},
                 'stem_bn': {'mean': np.zeros(4), 'var': np.ones(4)}}
  counters = {'stem_bw': {'fallbacks': np.float32(3), 'skipped_updates': np.float32(1)}}
  health = bw_health(batch_stats, counters)
  assert health == {'stem_bw/cov_condition': pytest.approx(4.0), 'stem_bw/fallbacks': 3,
                    'stem_bw/skipped_updates': 1}
  assert all(isinstance(health[f'stem_bw/{k}'], int) for k in ('fallbacks', 'skipped_updates'))


# ----------------------------------------------------------------------------------------------------------
# BW health on the console


def fake_bw_stats(fallbacks):
  """Two BW layers' (batch_stats, bw_health): covariances with known eigenvalues, the given fallback counters."""
  rng = np.random.RandomState(0)
  q = np.linalg.qr(rng.randn(3, 3))[0]
  cov_a = np.stack([q @ np.diag([1.0, 2.0, 4.0]) @ q.T, q @ np.diag([1.0, 1.0, 50.0]) @ q.T])  # (2, 3, 3)
  cov_b = (q @ np.diag([0.5, 1.0, 1.0]) @ q.T)[None]
  batch_stats = {'stem': {'bw': {'cov': cov_a}}, 'head': {'cov': cov_b}}
  counters = {'stem': {'bw': {'fallbacks': np.float32(fallbacks[0]), 'skipped_updates': np.float32(0)}},
              'head': {'fallbacks': np.float32(fallbacks[1]), 'skipped_updates': np.float32(0)}}
  return batch_stats, counters


def test_bw_health_text_has_the_total_fallbacks_and_the_worst_condition_number():
  health = train_health.bw_health(*fake_bw_stats((2, 3)))
  totals = train_health.bw_totals(health)
  worst = max(np.linalg.cond(c) for c in fake_bw_stats((0, 0))[0]['stem']['bw']['cov'])  # 50, from NumPy's SVD
  assert totals == (5, pytest.approx(worst, rel=1e-9))
  text, warning = train_health.bw_health_report(health, previous_fallbacks=5, max_fallbacks=-1)
  assert text == 'BW: fallbacks 5, worst condition number 50' and warning is None


def test_growing_fallbacks_warn_and_too_many_stop_the_run():
  health = train_health.bw_health(*fake_bw_stats((2, 3)))
  _, warning = train_health.bw_health_report(health, previous_fallbacks=1, max_fallbacks=-1)
  assert 'BW fallbacks grew from 1 to 5 since the last eval' in warning and 'model.bw.epsilon' in warning
  assert train_health.bw_health_report(health, previous_fallbacks=1, max_fallbacks=5)[1] is not None
  with pytest.raises(train_health.BWHealthError, match=r'5 BW fallbacks exceed config.bw_max_fallbacks=4'):
    train_health.bw_health_report(health, previous_fallbacks=1, max_fallbacks=4)


def test_a_model_without_bw_reports_nothing():
  assert train_health.bw_health_report({}, previous_fallbacks=0, max_fallbacks=0) == ('', None)


def test_an_override_that_another_key_makes_ignored_is_refused_naming_both():
  """configs/tiny_imagenet.py sets batch_size_per_device: a global --config.batch_size would be ignored."""
  config = load_from_command_line(os.path.join(REPO, 'configs', 'tiny_imagenet.py'), '--config.batch_size=10')
  with pytest.raises(ValueError, match=r'^config.batch_size=10 is ignored when config.batch_size_per_device=256 '
                                       r'is set') as error:
    validate_config(config)
  assert 'batch_size=256' not in str(error.value)  # Not a batch_size the user never gave.
