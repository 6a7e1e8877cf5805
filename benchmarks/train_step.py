"""Images/s of one jitted EfficientNet training step (forward, backward, optimizer update).

B0 at 64×64 (Tiny ImageNet: 200 classes), batch 64, for the BatchNorm baseline (stem 1, MBConv 0, head 1),
BW in the blocks (1, 2, 1) and BW everywhere (2, 2, 2). Compile time is reported apart; the steps of all
variants are timed round-robin so that the ratios to the baseline come from the same moments of a noisy
machine. Run from the repository root:

  .venv/bin/python benchmarks/train_step.py                  # the table
  .venv/bin/python benchmarks/train_step.py --markdown --steps 10
  .venv/bin/python benchmarks/train_step.py --depthwise xla  # XLA's grouped conv instead of 'shift'
"""

import argparse
import statistics
import time

import jax
import optax

from bw_jax.models.efficientnet import EfficientNet
from bw_jax.nn.whitening import BWSettings
from common import XLA_PRODUCTS, environment, forced_layout, format_table, progress  # benchmarks/common.py

# (stem_type, mbconv_type, head_type) and a name for each row.
VARIANTS = {'BN baseline (1, 0, 1)': (1, 0, 1), 'BW blocks (1, 2, 1)': (1, 2, 1),
            'BW everywhere (2, 2, 2)': (2, 2, 2)}
XLA_VARIANT = 'BW blocks (1, 2, 1), XLA products'


def make_step(model: EfficientNet, batch: int, size: int):
  """A compiled training step and its initial state; returns (step, state, images, labels, compile s)."""
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  labels = jax.random.randint(jax.random.key(1), (batch,), 0, model.num_classes)
  variables = jax.jit(lambda: model.init(jax.random.key(2), images[:2], train=False))()
  optimizer = optax.sgd(0.01, momentum=0.9)
  state = (variables['params'], variables['batch_stats'], optimizer.init(variables['params']))

  def loss_fn(params, batch_stats, images, labels, key):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                  mutable=['batch_stats'], rngs={'dropout': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']

  @jax.jit
  def step(state, images, labels, key):
    params, batch_stats, opt_state = state
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images,
                                                                          labels, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  start = time.perf_counter()
  compiled = step.lower(state, images, labels, jax.random.key(3)).compile()
  return compiled, state, images, labels, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=7, help='timed steps per variant (median reported)')
  parser.add_argument('--group-size', type=int, default=16)
  parser.add_argument('--depthwise', default='auto', choices=('auto', 'shift', 'xla'))
  parser.add_argument('--markdown', action='store_true')
  parser.add_argument('--xla-products', action='store_true',
                      help="also time BW blocks with XLA's group products (the layer without bw_jax/kernels)")
  args = parser.parse_args(argv)
  prefix = '- ' if args.markdown else ''
  print('\n'.join(prefix + line for line in environment()))
  print(f'{prefix}B0 {args.size}×{args.size}, batch {args.batch}, SGD momentum, BW cholesky '
        f'g={args.group_size}, depthwise {args.depthwise}, median of {args.steps} steps\n', flush=True)

  variants = {name: (types, None) for name, types in VARIANTS.items()}
  if args.xla_products:
    variants[XLA_VARIANT] = (VARIANTS['BW blocks (1, 2, 1)'], XLA_PRODUCTS)
  runs = {}
  for name, ((stem, mbconv, head), layout) in variants.items():
    progress(f'compiling {name}')
    model = EfficientNet(num_classes=200, stem_type=stem, mbconv_type=mbconv, head_type=head,
                         bw=BWSettings(group_size=args.group_size), depthwise_implementation=args.depthwise)
    with forced_layout(layout):  # the layers pick their products when the step is traced (in make_step)
      runs[name] = list(make_step(model, args.batch, args.size))
    step, state, images, labels, _ = runs[name]
    runs[name][1] = jax.block_until_ready(step(state, images, labels, jax.random.key(4))[0])  # warm-up

  seconds = {name: [] for name in runs}
  for i in range(args.steps):
    progress(f'timed round {i + 1}/{args.steps}')
    for name, run in runs.items():
      step, state, images, labels, _ = run
      start = time.perf_counter()
      run[1], loss = jax.block_until_ready(step(state, images, labels, jax.random.key(i)))
      seconds[name].append(time.perf_counter() - start)

  baseline = args.batch / statistics.median(seconds[next(iter(runs))])
  rows = [('variant', 'compile s', 'median step ms', 'images/s', 'ratio to BN')]
  for name, run in runs.items():
    median = statistics.median(seconds[name])
    rows.append((name, f'{run[4]:.1f}', f'{1e3 * median:.0f}', f'{args.batch / median:.1f}',
                 f'{args.batch / median / baseline:.2f}'))
  print(format_table(rows, args.markdown))


if __name__ == '__main__':
  main()
