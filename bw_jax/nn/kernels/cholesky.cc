// BatchWhitening's Cholesky trials on the CPU: S = L⁻¹ of Σ + ridge·I for a batch of small (g, g)
// covariances, with the usability check of `whitening_matrices._is_usable`, as one XLA FFI custom call.
//
// XLA's CPU runs a batched Cholesky as a LAPACK call per matrix and the triangular inverse as a loop of small
// solves: ~0.2 ms for the 2G = 144 groups of 16 of EfficientNet's 1152-channel head layer, a fifth of the
// layer's whole training step (BENCHMARKS.md). Here W matrices at a time share the SIMD lanes: every
// scalar step of the factorisation and of the inverse runs on W lanes at once (the innermost loops run over
// lanes, which the compiler vectorises), so 144 groups of 16 take a few microseconds.
//
//   BwCholeskyTrials(cov (B, g, g), exact (B,), relative (B,))
//     -> S (B, g, g), exact_ok (B,), relative_ok (B,)
//
// Per matrix: S = L⁻¹ of cov + exact·I when that is usable (every pivot above its round-off floor
// (g + 1)·eps·a_jj, S finite, max |S| ≤ 2/√exact), else of
// cov + relative·I (relative_ok says whether that one is usable; it is exact_ok where the exact trial
// succeeded and no retry ran). cov is read as given (the caller symmetrises it; only its lower triangle is
// used, as LAPACK's potrf with uplo='L'). S is lower-triangular, zero above the diagonal; float32 or float64.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes per batch: one 512-bit register of float32, two of float64 (AVX-512; narrower SIMD takes several).
constexpr int kLanes = 16;

// S = L⁻¹ of the lane matrices a + ridge·I, in place of the lanes' work arrays, and per lane whether S is
// usable. a, s: (g, g, kLanes) with the lane innermost; ridge, ok: (kLanes,).
template <typename T>
void CholeskyInverseLanes(int64_t g, const T* ridge, T* a, T* s, bool* ok) {
  auto at = [g](T* p, int64_t i, int64_t j) { return p + (i * g + j) * kLanes; };
  std::vector<T> reciprocal(g * kLanes);
  bool failed[kLanes] = {};
  std::vector<T> diagonal(g * kLanes);  // a_jj + ridge, for the pivots' round-off floor
  const T floor_scale = T(g + 1) * std::numeric_limits<T>::epsilon();
  for (int64_t i = 0; i < g; ++i) {
    T* d = at(a, i, i);
    for (int l = 0; l < kLanes; ++l) diagonal[i * kLanes + l] = d[l] += ridge[l];
  }
  // Cholesky, column by column (left-looking): L overwrites the lower triangle of a. Sums build in local
  // lane arrays (no aliasing: every lane loop vectorises).
  for (int64_t j = 0; j < g; ++j) {
    T pivot[kLanes];
    std::copy(at(a, j, j), at(a, j, j) + kLanes, pivot);
    for (int64_t k = 0; k < j; ++k) {
      const T* ljk = at(a, j, k);
      for (int l = 0; l < kLanes; ++l) pivot[l] -= ljk[l] * ljk[l];
    }
    T* r = reciprocal.data() + j * kLanes;
    T* d = at(a, j, j);
    for (int l = 0; l < kLanes; ++l) {
      // A pivot within its round-off of zero (or NaN) fails the matrix: `cholesky_pivot_floor` of
      // whitening_matrices.py, (g + 1)·eps·a_jj, which the XLA path applies to LAPACK's result.
      failed[l] |= !(pivot[l] > floor_scale * diagonal[j * kLanes + l]);
      d[l] = std::sqrt(pivot[l]);
      r[l] = T(1) / d[l];
    }
    for (int64_t i = j + 1; i < g; ++i) {
      T sum[kLanes];
      std::copy(at(a, i, j), at(a, i, j) + kLanes, sum);
      for (int64_t k = 0; k < j; ++k) {
        const T *lik = at(a, i, k), *ljk = at(a, j, k);
        for (int l = 0; l < kLanes; ++l) sum[l] -= lik[l] * ljk[l];
      }
      T* lij = at(a, i, j);
      for (int l = 0; l < kLanes; ++l) lij[l] = sum[l] * r[l];
    }
  }
  // S = L⁻¹ column by column: S_jj = 1/L_jj, S_ij = −(Σ_{k=j}^{i−1} L_ik S_kj)/L_ii.
  for (int64_t j = 0; j < g; ++j) {
    for (int64_t i = 0; i < j; ++i) std::fill(at(s, i, j), at(s, i, j) + kLanes, T(0));
    std::copy(reciprocal.data() + j * kLanes, reciprocal.data() + (j + 1) * kLanes, at(s, j, j));
    for (int64_t i = j + 1; i < g; ++i) {
      T sum[kLanes] = {};
      for (int64_t k = j; k < i; ++k) {
        const T *lik = at(a, i, k), *skj = at(s, k, j);
        for (int l = 0; l < kLanes; ++l) sum[l] += lik[l] * skj[l];
      }
      const T* ri = reciprocal.data() + i * kLanes;
      T* sij = at(s, i, j);
      for (int l = 0; l < kLanes; ++l) sij[l] = -sum[l] * ri[l];
    }
  }
  // Usable: finite and ‖S‖_max ≤ 2/√ridge (the bound every whitening of Σ + ridge·I obeys, with slack 2).
  // (x − x is 0 for a finite x and NaN for ±inf or NaN: one vectorisable test of all lanes.)
  T largest[kLanes] = {}, nan_if_not_finite[kLanes] = {};
  for (int64_t k = 0; k < g * g; ++k) {
    const T* v = s + k * kLanes;
    for (int l = 0; l < kLanes; ++l) {
      nan_if_not_finite[l] += v[l] - v[l];
      largest[l] = std::max(largest[l], std::abs(v[l]));
    }
  }
  for (int l = 0; l < kLanes; ++l)
    ok[l] = !failed[l] && nan_if_not_finite[l] == T(0) && largest[l] <= T(2) / std::sqrt(ridge[l]);
}

template <ffi::DataType dt>
ffi::Error CholeskyTrials(ffi::Buffer<dt> cov, ffi::Buffer<dt> exact, ffi::Buffer<dt> relative,
                          ffi::ResultBuffer<dt> out, ffi::ResultBuffer<ffi::DataType::PRED> exact_ok,
                          ffi::ResultBuffer<ffi::DataType::PRED> relative_ok) {
  using T = ffi::NativeType<dt>;
  const auto dims = cov.dimensions();
  if (dims.size() != 3 || dims[1] != dims[2])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "bw_jax Cholesky trials: cov must be (B, g, g)");
  const int64_t batch = dims[0], g = dims[1], size = g * g;
  const T* c = cov.typed_data();
  T* o = out->typed_data();
  std::vector<T> a(size * kLanes), s(size * kLanes);
  for (int64_t b0 = 0; b0 < batch; b0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, batch - b0));
    // Lanes past the batch factorise the identity (ridge 1): no lane computes on garbage.
    auto factorise = [&](const T* ridges, bool* ok) {
      T ridge[kLanes];
      for (int l = 0; l < kLanes; ++l) ridge[l] = l < n ? ridges[b0 + l] : T(1);
      for (int64_t k = 0; k < size; ++k)
        for (int l = 0; l < kLanes; ++l)
          a[k * kLanes + l] = l < n ? c[(b0 + l) * size + k] : T(0);
      CholeskyInverseLanes<T>(g, ridge, a.data(), s.data(), ok);
    };
    auto store = [&](int l) {
      for (int64_t k = 0; k < size; ++k) o[(b0 + l) * size + k] = s[k * kLanes + l];
    };
    bool first[kLanes], second[kLanes];
    factorise(exact.typed_data(), first);
    bool all_ok = true;
    for (int l = 0; l < n; ++l) {
      exact_ok->typed_data()[b0 + l] = first[l];
      relative_ok->typed_data()[b0 + l] = first[l];
      if (first[l]) store(l);
      all_ok &= first[l];
    }
    if (all_ok) continue;
    factorise(relative.typed_data(), second);
    for (int l = 0; l < n; ++l)
      if (!first[l]) {
        relative_ok->typed_data()[b0 + l] = second[l];
        store(l);
      }
  }
  return ffi::Error::Success();
}

}  // namespace

#define BW_TRIALS(name, dt)                                                                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, CholeskyTrials<dt>,                                                  \
                                ffi::Ffi::Bind()                                                           \
                                    .Arg<ffi::Buffer<dt>>()                                                \
                                    .Arg<ffi::Buffer<dt>>()                                                \
                                    .Arg<ffi::Buffer<dt>>()                                                \
                                    .Ret<ffi::Buffer<dt>>()                                                \
                                    .Ret<ffi::Buffer<ffi::DataType::PRED>>()                               \
                                    .Ret<ffi::Buffer<ffi::DataType::PRED>>())

BW_TRIALS(BwCholeskyTrialsF32, ffi::DataType::F32);
BW_TRIALS(BwCholeskyTrialsF64, ffi::DataType::F64);
