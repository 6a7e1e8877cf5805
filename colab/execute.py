"""Runs colab/bw_jax_explore.ipynb top to bottom and stores it with its outputs (`make notebook`), so that the
figures show where the repository is browsed. FAST is on when JAX runs on the CPU (the notebook says why)."""

import os
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bw_jax_explore.ipynb')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_local_paths(nb: nbformat.NotebookNode) -> None:
  """Printed paths of this checkout read '.' (the repository), so the stored outputs do not depend on where it
  was cloned."""
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if 'text' in out:
        out['text'] = out['text'].replace(REPO, '.')


def execute(path: str = NOTEBOOK) -> None:
  nb = nbformat.read(path, as_version=4)
  # The kernel is this interpreter (jupyter_client replaces the kernelspec's `python` by sys.executable);
  # a failing cell raises CellExecutionError naming it, and nothing is written.
  NotebookClient(nb, timeout=1200, kernel_name='python3', record_timing=False,
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  without_local_paths(nb)
  nbformat.write(nb, path)
  figures = sum('image/png' in out.get('data', {}) for cell in nb.cells for out in cell.get('outputs', []))
  print(f'{path}: {len(nb.cells)} cells run, {figures} figures stored')


if __name__ == '__main__':
  execute(*sys.argv[1:])
