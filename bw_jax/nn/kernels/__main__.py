"""`python -m bw_jax.nn.kernels`: builds the CPU kernels now (else the first BatchWhitening on a CPU does)."""

import sys

from bw_jax.nn import kernels

if __name__ == '__main__':
  if kernels.available():
    print(f'bw_jax CPU kernels: {kernels.build()}')
  else:
    print('bw_jax CPU kernels: not available (see the warning above); BatchWhitening uses XLA on the CPU.')
  sys.exit(0)
