"""Images/s of the training input pipeline alone (no model), per dataset, on synthetic data made on the fly.

What is timed is `bw_jax.data.create_split(..., train=True, normalise=False)` as training uses it:
shuffle, decode (ImageNet: only the random-resized crop of each JPEG), augment, round to uint8 and batch,
up to the NumPy batch on the host. The data comes from `bw_jax.data.synthetic`: for ImageNet, JPEGs of
ImageNet-like sizes (~500×375) read through TFDS's `imagenet2012` builder; for the others, random uint8
images of the native size. tf.data uses every core the process may run on. Two figures per core:
images/s divided by those cores (wall clock), and images per CPU-second of the process (all its threads),
which does not depend on other processes sharing the cores.
Run from the repository root:

  .venv/bin/python benchmarks/input_pipeline.py                     # all datasets, Markdown table
  .venv/bin/python benchmarks/input_pipeline.py --datasets imagenet2012 --batches 40
  .venv/bin/python benchmarks/input_pipeline.py --quick             # seconds: a few small batches

Progress goes to stderr, the table to stdout.
"""

import argparse
import os
import time


from bw_jax import data
from bw_jax.data import synthetic
from common import environment, format_table, progress  # benchmarks/common.py

BATCH = {'imagenet2012': 128, 'tiny_imagenet': 256, 'fashion_mnist': 256}
QUICK = dict(batches=3, warmup=1, examples=256, batch_divisor=8)


def usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def pipeline_images_per_second(name: str, batch: int, batches: int, warmup: int = 2,
                               examples: int = 2048) -> dict:
  """{'dataset', 'image_size', 'batch', 'images_per_sec', 'per_core', 'per_cpu_second'} of `batches`
  training batches of `name` after `warmup` untimed ones (tf.data's threads and buffers filling)."""
  config = data.default_dataset_config(name)
  config.shuffle_buffer = min(config.shuffle_buffer, examples)
  with synthetic.synthetic_data(name, examples):
    iterator, _ = data.create_split(config, config.train_split, batch, train=True, seed=0, normalise=False)
    for _ in range(warmup):
      next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(iterator)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  rate = batches * batch / seconds
  return {'dataset': name, 'image_size': int(config.image_size), 'batch': batch, 'images_per_sec': rate,
          'per_core': rate / usable_cores(), 'per_cpu_second': batches * batch / cpu_seconds}


def markdown_rows(results: list[dict]) -> str:
  cells = [('dataset', 'image size', 'batch', 'images/s', f'images/s per core ({usable_cores()} cores)',
            'images per CPU-second')]
  cells += [(r['dataset'], str(r['image_size']), str(r['batch']), f"{r['images_per_sec']:.0f}",
             f"{r['per_core']:.0f}", f"{r['per_cpu_second']:.0f}") for r in results]
  return format_table(cells, markdown=True, text_columns=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--datasets', nargs='+', default=list(BATCH), choices=list(BATCH))
  parser.add_argument('--batches', type=int, default=30, help='timed batches per dataset.')
  parser.add_argument('--warmup', type=int, default=3, help='untimed batches first.')
  parser.add_argument('--examples', type=int, default=2048, help='size of each synthetic split.')
  parser.add_argument('--quick', action='store_true', help=f'smoke run: {QUICK}.')
  args = parser.parse_args(argv)
  args.batch_divisor = 1
  if args.quick:
    vars(args).update(QUICK)
  if min(args.batches, args.examples) < 1 or args.warmup < 0:
    parser.error('--batches and --examples must be positive, --warmup at least 0.')
  return args


def run(args: argparse.Namespace) -> list[dict]:
  results = []
  for name in args.datasets:
    batch = BATCH[name] // args.batch_divisor
    progress(f'{name}: {args.warmup} + {args.batches} batches of {batch}')
    results.append(pipeline_images_per_second(name, batch, args.batches, args.warmup, args.examples))
    progress(f"{name}: {results[-1]['images_per_sec']:.0f} images/s")
  return results


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  print('\n'.join('- ' + line for line in environment()) + '\n')
  print(markdown_rows(run(args)))


if __name__ == '__main__':
  main()
