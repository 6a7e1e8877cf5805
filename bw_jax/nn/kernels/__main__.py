"""`python -m bw_jax.nn.kernels`: builds the CPU kernels now (else the first BatchWhitening on a CPU does).
Exit status 1, with one `error:` line, where a C++ compiler is there but fails; 0 without one."""

import sys

from bw_jax.nn import kernels

if __name__ == '__main__':
  try:
    built = kernels.available()
  except kernels.KernelBuildError as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(1)
  if built:
    print(f'bw_jax CPU kernels: {kernels.build()}')
  else:
    print(f'bw_jax CPU kernels: not used ({kernels.unavailable_reason()}); BatchWhitening uses XLA on the CPU.')
