"""CPU kernels for BatchWhitening: the per-group products in place on (m, C) (`group_products.cc`) and the
Cholesky trials of the (G, g, g) statistics (`cholesky.cc`).

On a CPU, XLA runs the layer's per-group products as batched GEMMs on a (G, m, g) transposed copy of the
activations: every product pays a copy in and a copy out, and the 17-wide GEMMs run far below the machine's
speed (BENCHMARKS.md). These three XLA FFI custom calls read the (m, C) rows where they lie and keep a
group's g-wide vectors in registers:

  group_cross(a, sa, b, sb, groups)            (G, g, g + 1) = [a − sa]ᵀ [b − sb, 1] per group
  group_transform(a, sa, M, offset)            (m, C)        = (a − sa) Mᵀ + offset per group
  group_transform2(a, sa, A, b, sb, B, offset) (m, C)        = (a − sa) Aᵀ + (b − sb) Bᵀ + offset

a, b (m, C); sa, sb, offset (C,); M, A, B (G, g, g); float32 or float64 (one dtype per call). They are
differentiable to any order: the primal runs the kernel, the tangents are the same products written with
jnp (XLA), so autodiff and forward mode work as on the XLA layouts; vmap runs the kernel per element.

  cholesky_trials(cov, exact, relative)        S (B, g, g), exact_ok (B,), relative_ok (B,)

is `whitening_matrices`' two Cholesky trials (Σ + ridge·I factorised and inverted, checked usable) for 16
groups at a time in the SIMD lanes; it runs on stop_gradient'ed covariances and has no derivative.

The C++ sources ship in the package and are compiled on first use with the machine's C++ compiler (`$CXX`,
else `g++`/`c++`, `-O3 -march=native`, ~5 s) into a cache keyed by the source, the compiler, jaxlib and the
CPU (`$BW_JAX_KERNEL_CACHE`, default `~/.cache/bw_jax/kernels`). `python -m bw_jax.nn.kernels` builds it ahead
(the Makefile's setup does). Without a compiler (one warning says so), or with `BW_JAX_CPU_KERNELS=0`,
`available()` is False and the layer uses XLA's batched products on the CPU (2–4× slower for the layer; GPU and
TPU never use these kernels). A compiler that is there but fails is an error (`KernelBuildError`), not a
slower layer: a broken toolchain would otherwise pass unnoticed, and the kernel tests with it.
"""

from collections.abc import Callable
import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
import platform
import shutil
import subprocess
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import jaxlib

from bw_jax.nn.sharding import rows_spec, sample_axes, summed_sharding

SOURCES = tuple(Path(__file__).with_name(name) for name in ('group_products.cc', 'cholesky.cc'))
_TARGETS = {  # (kind, dtype) -> FFI target name, the handler's symbol
    (kind, dtype): f'Bw{kind}{suffix}'
    for kind in ('GroupCross', 'GroupTransform', 'GroupTransform2', 'CholeskyTrials')
    for dtype, suffix in (('float32', 'F32'), ('float64', 'F64'))}
DTYPES = (jnp.float32, jnp.float64)
DISABLE_ENV = 'BW_JAX_CPU_KERNELS'
CACHE_ENV = 'BW_JAX_KERNEL_CACHE'

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Build, load, register


class KernelBuildError(RuntimeError):
  """A C++ compiler is there but the kernels do not build or load (the message gives its first error and
  the ways out)."""


def build_error(cxx: str, detail: str) -> KernelBuildError:
  return KernelBuildError(
      f'the CPU kernels do not build with {cxx}: {detail}. Fix the compiler or set $CXX to another; or set '
      f"{DISABLE_ENV}=0 to use XLA's batched products instead (2-4x slower for BatchWhitening on the CPU).")


def compiler() -> str | None:
  """The C++ compiler to use: `$CXX`, else g++ or c++ on PATH; None if there is none."""
  for name in (os.environ.get('CXX'), 'g++', 'c++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def compile_command(cxx: str, output: Path) -> list[str]:
  # -fno-math-errno: std::sqrt without errno, so that the Cholesky kernel's lane loops vectorise.
  return [cxx, '-O3', '-march=native', '-fno-math-errno', '-std=c++17', '-shared', '-fPIC', '-w',
          '-I', jax.ffi.include_dir(), *map(str, SOURCES), '-o', str(output)]


def _cpu_description() -> str:
  """What `-march=native` compiles for: the CPU model and its flags."""
  try:
    text = Path('/proc/cpuinfo').read_text()
  except OSError:
    return platform.processor() or platform.machine()
  lines = [line for line in text.splitlines() if line.startswith(('model name', 'flags', 'Features'))]
  return '\n'.join(sorted(set(lines)))


def cache_dir() -> Path:
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV])
  return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'bw_jax' / 'kernels'


def library_path(cxx: str) -> Path:
  """Where the build for this source, compiler, jaxlib and CPU lives."""
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True, check=False).stdout
  key = '\0'.join([*(source.read_text() for source in SOURCES), cxx, version, jaxlib.__version__,
                   platform.machine(), _cpu_description()])
  return cache_dir() / f'bw_group_products_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so'


def build() -> Path:
  """Compiles the kernels unless this build is cached; returns the shared library's path. Raises
  KernelBuildError with the compiler's first error if it fails (RuntimeError if there is no compiler)."""
  cxx = compiler()
  if cxx is None:
    raise RuntimeError('no C++ compiler found (set $CXX, or install g++)')
  path = library_path(cxx)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Compiled to a private name, then renamed: concurrent processes never load a half-written library.
  with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
    output = Path(scratch) / path.name
    result = subprocess.run(compile_command(cxx, output), capture_output=True, text=True, check=False)
    if result.returncode != 0:
      errors = [line for line in result.stderr.splitlines() if 'error' in line] or result.stderr.splitlines()
      raise build_error(cxx, errors[0].strip() if errors else f'no message (exit status {result.returncode})')
    os.replace(output, path)
  return path


def unavailable_reason() -> str | None:
  """Why the kernels are not used on purpose: switched off, or no C++ compiler; None when they should be
  (they build, or `available()` raises KernelBuildError)."""
  if os.environ.get(DISABLE_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return f'switched off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}'
  if compiler() is None:
    return 'no C++ compiler found: set $CXX, or install g++'
  return None


@functools.cache
def _loaded() -> bool | KernelBuildError:
  """Builds, loads and registers the kernels once: True, False (`unavailable_reason`), or the build's error
  (kept, so that every later call raises it without compiling again)."""
  reason = unavailable_reason()
  if reason is not None:
    if compiler() is None:
      _log.warning('bw_jax: the CPU group-product kernels are not available (%s); BatchWhitening on the CPU '
                   "uses XLA's batched products instead (2-4x slower there; GPU/TPU are unaffected).", reason)
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except KernelBuildError as error:
    return error
  except OSError as error:  # Built, but it does not load (a missing symbol, another architecture).
    return build_error(compiler(), str(error).splitlines()[0])
  for target in _TARGETS.values():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform='cpu')
  return True


def available() -> bool:
  """Whether the kernels are built, loaded and registered with XLA's CPU backend (builds on first call);
  False when `unavailable_reason()` says why. KernelBuildError where a compiler is there but fails."""
  loaded = _loaded()
  if isinstance(loaded, KernelBuildError):
    raise loaded
  return loaded


# ----------------------------------------------------------------------------------------------------------
# The products: kernel forward, jnp derivatives


def _by_group(a: jax.Array, groups: int) -> jax.Array:
  return a.reshape(*a.shape[:-1], groups, -1)


def cross_reference(a, sa, b, sb, *, groups: int) -> jax.Array:
  """group_cross in jnp: (m, C) ×2, (C,) ×2 -> (G, g, g + 1)."""
  d_a, d_b = _by_group(a - sa, groups), _by_group(b - sb, groups)
  cross = jnp.einsum('mgi,mgj->gij', d_a, d_b, out_sharding=summed_sharding())
  return jnp.concatenate([cross, jnp.sum(d_a, axis=0)[:, :, None]], axis=2)


def transform_reference(a, sa, matrices, offset) -> jax.Array:
  """group_transform in jnp: (m, C), (C,), (G, g, g), (C,) -> (m, C)."""
  groups = matrices.shape[0]
  return jnp.einsum('mgj,gij->mgi', _by_group(a - sa, groups), matrices).reshape(a.shape) + offset


def transform2_reference(a, sa, a_matrices, b, sb, b_matrices, offset) -> jax.Array:
  return transform_reference(a, sa, a_matrices, offset) + transform_reference(b, sb, b_matrices,
                                                                              jnp.zeros_like(offset))


def _checked(*arrays: jax.Array) -> str:
  dtype = arrays[0].dtype
  if dtype not in DTYPES or any(a.dtype != dtype for a in arrays):
    raise TypeError(f'bw_jax CPU kernels take float32 or float64 operands of one dtype; got '
                    f'{[str(a.dtype) for a in arrays]}.')
  return str(dtype)


def _call(kind: str, result: Any, *operands: jax.Array) -> Any:
  if not available():
    raise RuntimeError('bw_jax CPU kernels are not available (see the warning above, or BW_JAX_CPU_KERNELS); '
                       'check bw_jax.nn.kernels.available() before calling them.')
  out = jax.ffi.ffi_call(_TARGETS[kind, _checked(*operands)], result, vmap_method='sequential')(*operands)
  return jax.tree.map(lambda leaf: _varying_like(leaf, operands), out)


def _varying_like(out: jax.Array, operands: tuple[jax.Array, ...]) -> jax.Array:
  """`out` marked as varying along the shard_map axes any operand varies along, as a jnp operation on the
  operands would be (an FFI call's result carries no such type; inside shard_map, JAX checks it)."""
  varying = set().union(*(getattr(getattr(jax.typeof(a), 'manual_axis_type', None), 'varying', frozenset())
                          for a in operands))  # jax 0.10's name for what older releases called `vma`
  return jax.lax.pcast(out, tuple(sorted(varying)), to='varying') if varying else out


def _with_reference_derivatives(kernel: Callable[..., jax.Array], reference: Callable[..., jax.Array],
                                ) -> Callable[..., jax.Array]:
  """`kernel` for values; tangents (and so every derivative, to any order) from the jnp `reference`."""
  function = jax.custom_jvp(kernel)
  # The primal through `function` again, not `kernel`: under a second derivative the primals are tangents'
  # tracers themselves, and the rule must apply once more.
  function.defjvp(lambda primals, tangents: (function(*primals), jax.jvp(reference, primals, tangents)[1]))
  return function


def _on_shards(kernel: Callable[..., jax.Array], operands: tuple[jax.Array, ...], rows: tuple[int, ...],
               summed: bool) -> jax.Array:
  """kernel(*operands), each device computing it on its own shard of the samples where they are sharded over
  explicit mesh axes (`jax.shard_map`): the operands at `rows` (m, C) split by rows, the others whole; a
  `summed` result (a sum over the samples) added over the shards in one psum of its (G, g, g + 1), else the
  result's rows left where the samples lie. Elsewhere (one device, Auto meshes, inside shard_map or pmap)
  the kernel itself: a custom call is opaque to XLA's partitioner, which gathers its operands."""
  axes = next((found for found in (sample_axes(operands[i]) for i in rows) if found), ())
  if not axes:
    return kernel(*operands)
  spec = rows_spec(axes)
  in_specs = tuple(spec if i in rows else PartitionSpec() for i in range(len(operands)))
  operands = tuple(jax.sharding.reshard(a, s) for a, s in zip(operands, in_specs))  # no-op when placed so

  def local(*shards: jax.Array) -> jax.Array:
    out = kernel(*shards)
    return jax.lax.psum(out, axes) if summed else out
  return jax.shard_map(local, in_specs=in_specs, out_specs=PartitionSpec() if summed else spec,
                       axis_names=set(axes))(*operands)


def _cross_kernel(a, sa, b, sb, *, groups):
  g = a.shape[1] // groups
  kernel = lambda a, sa, b, sb: _call('GroupCross', jax.ShapeDtypeStruct((groups, g, g + 1), a.dtype), a, sa, b, sb)
  return _on_shards(kernel, (a, sa, b, sb), rows=(0, 2), summed=True)


def _transform_kernel(a, sa, matrices, offset):
  kernel = lambda a, *rest: _call('GroupTransform', jax.ShapeDtypeStruct(a.shape, a.dtype), a, *rest)
  return _on_shards(kernel, (a, sa, jnp.swapaxes(matrices, 1, 2), offset), rows=(0,), summed=False)


def _transform2_kernel(a, sa, a_matrices, b, sb, b_matrices, offset):
  kernel = lambda a, *rest: _call('GroupTransform2', jax.ShapeDtypeStruct(a.shape, a.dtype), a, *rest)
  operands = (a, sa, jnp.swapaxes(a_matrices, 1, 2), b, sb, jnp.swapaxes(b_matrices, 1, 2), offset)
  return _on_shards(kernel, operands, rows=(0, 3), summed=False)


def group_cross(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, groups: int) -> jax.Array:
  """[a − sa]ᵀ [b − sb, 1] per group: (m, C), (C,), (m, C), (C,) -> (G, g, g + 1) (last column Σ(a − sa))."""
  return _with_reference_derivatives(functools.partial(_cross_kernel, groups=groups),
                                     functools.partial(cross_reference, groups=groups))(a, sa, b, sb)


# (a − sa) Mᵀ + offset per group: (m, C), (C,), (G, g, g), (C,) -> (m, C).
group_transform = _with_reference_derivatives(_transform_kernel, transform_reference)
# (a − sa) Aᵀ + (b − sb) Bᵀ + offset per group, in one pass: (m, C), (C,), (G, g, g), (m, C), (C,), (G, g, g),
# (C,) -> (m, C).
group_transform2 = _with_reference_derivatives(_transform2_kernel, transform2_reference)


def cholesky_trials(cov: jax.Array, exact: jax.Array, relative: jax.Array,
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`whitening_matrices`' two Cholesky trials in one call (`cholesky.cc`): (B, g, g), (B,), (B,) ->
  S (B, g, g), exact_ok (B,), relative_ok (B,).

  S = L⁻¹ of cov + exact·I where that is usable (every pivot above `cholesky_pivot_floor`, S finite,
  max |S| ≤ 2/√exact: `whitening_matrices._is_usable`), else of cov + relative·I;
  relative_ok: whether that retry is usable (where no retry ran, exact_ok). cov symmetric (its lower triangle
  is read). No derivative: the trials run on stop_gradient'ed covariances.
  """
  flags = jax.ShapeDtypeStruct(cov.shape[:1], jnp.bool_)
  return _call('CholeskyTrials', (jax.ShapeDtypeStruct(cov.shape, cov.dtype), flags, flags), cov,
               exact.astype(cov.dtype), relative.astype(cov.dtype))
