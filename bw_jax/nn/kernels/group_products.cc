// BatchWhitening's per-group products on (m, C) activations in place, for the CPU (XLA FFI custom calls).
//
// The layer's products pair every sample's g channels of a group with a (g, g) matrix. XLA runs them as
// batched GEMMs on a (G, m, g) transposed copy, so each product costs a copy in and a copy out on top of its
// arithmetic (~13 passes over (m, C) per training step against BatchNorm's ~7, BENCHMARKS.md). These kernels
// read rows of (m, C) where they lie and keep a group's g-wide vectors in registers:
//
//   BwGroupCross       out (G, g, g+1) = [a − sa]ᵀ [b − sb, 1] per group   (covariance with sums; dyᵀ[d, 1])
//   BwGroupTransform   out (m, C)      = (a − sa) Aᵀ + offset per group     (y = S d − S μ)
//   BwGroupTransform2  out (m, C)      = (a − sa) Aᵀ + (b − sb) Bᵀ + offset (dx = Sᵀ dy + W d + c)
//
// a, b (m, C); sa, sb, offset (C,); A, B given transposed, (G, g, g) with At[j][i] = A[i][j]. float32 and
// float64. Rows are split into fixed chunks over XLA's CPU thread pool; partial cross products are summed in
// chunk order, so results do not depend on the threads' timing (runs stay deterministic).
// bw_jax/kernels/__init__.py compiles this file on first use and registers the handlers.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// body(begin, end, chunk_index) over [0, n) in chunks of `chunk` rows, on the caller and the pool's threads.
// The caller claims chunks too and waits only for chunks already being computed, so a busy pool (every
// thread inside a kernel) cannot deadlock it; a helper task that starts late finds nothing left and returns.
template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t n, int64_t chunk, const Body& body) {
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_chunks - 1);
  if (helpers <= 0) {
    for (int64_t c = 0; c < num_chunks; ++c) body(c * chunk, std::min(n, (c + 1) * chunk), c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const Body* shared_body = &body;  // used by a helper only while it holds an unfinished chunk
  auto work = [state, num_chunks, chunk, n, shared_body] {
    for (int64_t c; (c = state->next.fetch_add(1)) < num_chunks;) {
      (*shared_body)(c * chunk, std::min(n, (c + 1) * chunk), c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  while (state->done.load(std::memory_order_acquire) < num_chunks) std::this_thread::yield();
}

// Rows per chunk: enough work per task (≥ 128 K elements, ~2 M multiply-adds at g = 16, so that a chunk's
// partial cross product and its summation stay small next to its work) and at most 8 chunks per call.
int64_t ChunkRows(int64_t m, int64_t C) {
  return std::max<int64_t>(std::max<int64_t>(4, 131072 / std::max<int64_t>(C, 1)), (m + 7) / 8);
}

// g-wide vectors of T for the power-of-two group sizes 4, 8, 16, 32 (GCC/Clang vector extensions: one or more
// SIMD registers each); g = 6, 10, 12 (EfficientNet's 24- and 40-channel layers at g ≤ 16) take fixed-size
// unrolled loops, any other g scalar loops.
template <typename T, int kG>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * kG)));
};
template <typename T, int kG>
using Vec = typename VecOf<T, kG>::type;

template <typename V, typename T>
inline V Load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void Store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Rows of a row block that stay in L2 while every group reads its columns (≤ 512 KB of a and b): each block
// adds its accumulators to the chunk's partial cross product once per group.
int64_t BlockRows(int64_t C, int64_t item_size) {
  return std::max<int64_t>(8, (256 * 1024) / std::max<int64_t>(C * item_size, 1));
}

// acc (G, g, g+1) += [a − sa]ᵀ [b − sb, 1] over rows [r0, r1): per group, g row vectors in registers.
template <typename T, int kG>
void CrossVector(const T* a, const T* sa, const T* b, const T* sb, int64_t C, int64_t groups, int64_t r0,
                 int64_t r1, T* acc) {
  using V = Vec<T, kG>;
  const int64_t block = BlockRows(C, sizeof(T));
  for (int64_t rb = r0; rb < r1; rb += block) {
    const int64_t re = std::min(r1, rb + block);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t c0 = gi * kG;
      T* out = acc + gi * kG * (kG + 1);
      V rows[kG];
      V sums = {};
      for (int i = 0; i < kG; ++i) rows[i] = V{};
      const V shift_a = Load<V>(sa + c0), shift_b = Load<V>(sb + c0);
      for (int64_t r = rb; r < re; ++r) {
        const V av = Load<V>(a + r * C + c0) - shift_a;
        const V bv = Load<V>(b + r * C + c0) - shift_b;
        for (int i = 0; i < kG; ++i) rows[i] += av[i] * bv;
        sums += av;
      }
      for (int i = 0; i < kG; ++i) {
        Store(out + i * (kG + 1), Load<V>(out + i * (kG + 1)) + rows[i]);
        out[i * (kG + 1) + kG] += sums[i];
      }
    }
  }
}

// The same for a g that is not a power of two (no g-wide vector type): fixed-size arrays the compiler unrolls.
template <typename T, int kG>
void CrossUnrolled(const T* a, const T* sa, const T* b, const T* sb, int64_t C, int64_t groups, int64_t r0,
                   int64_t r1, T* acc) {
  const int64_t block = BlockRows(C, sizeof(T));
  for (int64_t rb = r0; rb < r1; rb += block) {
    const int64_t re = std::min(r1, rb + block);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t c0 = gi * kG;
      T* out = acc + gi * kG * (kG + 1);
      T rows[kG][kG] = {};
      T sums[kG] = {};
      for (int64_t r = rb; r < re; ++r) {
        T av[kG], bv[kG];
        for (int i = 0; i < kG; ++i) {
          av[i] = a[r * C + c0 + i] - sa[c0 + i];
          bv[i] = b[r * C + c0 + i] - sb[c0 + i];
        }
        for (int i = 0; i < kG; ++i)
#pragma GCC unroll 16
          for (int j = 0; j < kG; ++j) rows[i][j] += av[i] * bv[j];
        for (int i = 0; i < kG; ++i) sums[i] += av[i];
      }
      for (int i = 0; i < kG; ++i) {
        for (int j = 0; j < kG; ++j) out[i * (kG + 1) + j] += rows[i][j];
        out[i * (kG + 1) + kG] += sums[i];
      }
    }
  }
}

template <typename T>
void CrossScalar(const T* a, const T* sa, const T* b, const T* sb, int64_t C, int64_t groups, int64_t g,
                 int64_t r0, int64_t r1, T* acc) {
  std::vector<T> av(g), bv(g);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t c0 = gi * g;
      for (int64_t j = 0; j < g; ++j) {
        av[j] = a[r * C + c0 + j] - sa[c0 + j];
        bv[j] = b[r * C + c0 + j] - sb[c0 + j];
      }
      T* out = acc + gi * g * (g + 1);
      for (int64_t i = 0; i < g; ++i) {
        for (int64_t j = 0; j < g; ++j) out[i * (g + 1) + j] += av[i] * bv[j];
        out[i * (g + 1) + g] += av[i];
      }
    }
}

template <typename T>
void CrossRows(const T* a, const T* sa, const T* b, const T* sb, int64_t C, int64_t groups, int64_t g,
               int64_t r0, int64_t r1, T* acc) {
  switch (g) {
    case 4: return CrossVector<T, 4>(a, sa, b, sb, C, groups, r0, r1, acc);
    case 6: return CrossUnrolled<T, 6>(a, sa, b, sb, C, groups, r0, r1, acc);
    case 8: return CrossVector<T, 8>(a, sa, b, sb, C, groups, r0, r1, acc);
    case 10: return CrossUnrolled<T, 10>(a, sa, b, sb, C, groups, r0, r1, acc);
    case 12: return CrossUnrolled<T, 12>(a, sa, b, sb, C, groups, r0, r1, acc);
    case 16: return CrossVector<T, 16>(a, sa, b, sb, C, groups, r0, r1, acc);
    case 32: return CrossVector<T, 32>(a, sa, b, sb, C, groups, r0, r1, acc);
    default: return CrossScalar<T>(a, sa, b, sb, C, groups, g, r0, r1, acc);
  }
}

// out rows [r0, r1) = (a − sa) Aᵀ [+ (b − sb) Bᵀ] + offset per group, four rows at a time in registers.
template <typename T, int kG, bool kTwo>
void TransformVector(const T* a, const T* sa, const T* At, const T* b, const T* sb, const T* Bt,
                     const T* offset, int64_t C, int64_t groups, int64_t r0, int64_t r1, T* out) {
  using V = Vec<T, kG>;
  constexpr int kRows = 4;
  for (int64_t r = r0; r < r1; r += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, r1 - r));
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t c0 = gi * kG;
      V y[kRows];
      const V off = Load<V>(offset + c0);
      for (int k = 0; k < kRows; ++k) y[k] = off;
      for (int term = 0; term < (kTwo ? 2 : 1); ++term) {
        const T* x = term == 0 ? a : b;
        const V shift = Load<V>((term == 0 ? sa : sb) + c0);
        const T* mt = (term == 0 ? At : Bt) + gi * kG * kG;
        T xv[kRows][kG] = {};  // rows minus the shift, read back one lane at a time as broadcasts
        for (int k = 0; k < rows; ++k) Store(xv[k], Load<V>(x + (r + k) * C + c0) - shift);
        for (int j = 0; j < kG; ++j) {
          const V column = Load<V>(mt + j * kG);
          for (int k = 0; k < kRows; ++k) y[k] += xv[k][j] * column;
        }
      }
      for (int k = 0; k < rows; ++k) Store(out + (r + k) * C + c0, y[k]);
    }
  }
}

template <typename T, int kG, bool kTwo>
void TransformUnrolled(const T* a, const T* sa, const T* At, const T* b, const T* sb, const T* Bt,
                       const T* offset, int64_t C, int64_t groups, int64_t r0, int64_t r1, T* out) {
  constexpr int kRows = 4;
  for (int64_t r = r0; r < r1; r += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, r1 - r));
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t c0 = gi * kG;
      T y[kRows][kG];
      for (int k = 0; k < kRows; ++k)
        for (int i = 0; i < kG; ++i) y[k][i] = offset[c0 + i];
      for (int term = 0; term < (kTwo ? 2 : 1); ++term) {
        const T* x = term == 0 ? a : b;
        const T* shift = term == 0 ? sa : sb;
        const T* mt = (term == 0 ? At : Bt) + gi * kG * kG;
        T xv[kRows][kG] = {};
        for (int k = 0; k < rows; ++k)
          for (int i = 0; i < kG; ++i) xv[k][i] = x[(r + k) * C + c0 + i] - shift[c0 + i];
        for (int j = 0; j < kG; ++j)
          for (int k = 0; k < kRows; ++k)
#pragma GCC unroll 16
            for (int i = 0; i < kG; ++i) y[k][i] += xv[k][j] * mt[j * kG + i];
      }
      for (int k = 0; k < rows; ++k) std::memcpy(out + (r + k) * C + c0, y[k], sizeof(T) * kG);
    }
  }
}

template <typename T, bool kTwo>
void TransformScalar(const T* a, const T* sa, const T* At, const T* b, const T* sb, const T* Bt,
                     const T* offset, int64_t C, int64_t groups, int64_t g, int64_t r0, int64_t r1, T* out) {
  std::vector<T> y(g);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t c0 = gi * g;
      for (int64_t i = 0; i < g; ++i) y[i] = offset[c0 + i];
      for (int64_t j = 0; j < g; ++j) {
        const T v = a[r * C + c0 + j] - sa[c0 + j];
        for (int64_t i = 0; i < g; ++i) y[i] += v * At[(gi * g + j) * g + i];
      }
      if (kTwo)
        for (int64_t j = 0; j < g; ++j) {
          const T v = b[r * C + c0 + j] - sb[c0 + j];
          for (int64_t i = 0; i < g; ++i) y[i] += v * Bt[(gi * g + j) * g + i];
        }
      std::copy(y.begin(), y.end(), out + r * C + c0);
    }
}

template <typename T, bool kTwo>
void TransformRows(const T* a, const T* sa, const T* At, const T* b, const T* sb, const T* Bt, const T* offset,
                   int64_t C, int64_t groups, int64_t g, int64_t r0, int64_t r1, T* out) {
  switch (g) {
    case 4: return TransformVector<T, 4, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    case 6: return TransformUnrolled<T, 6, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    case 8: return TransformVector<T, 8, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    case 10: return TransformUnrolled<T, 10, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    case 12: return TransformUnrolled<T, 12, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    case 16: return TransformVector<T, 16, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    case 32: return TransformVector<T, 32, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, r0, r1, out);
    default: return TransformScalar<T, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, g, r0, r1, out);
  }
}

ffi::Error CheckShapes(int64_t C, int64_t groups) {
  if (groups <= 0 || C % groups != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "bw_jax group kernels: groups must divide C");
  return ffi::Error::Success();
}

template <ffi::DataType dt>
ffi::Error GroupCross(ffi::ThreadPool pool, ffi::Buffer<dt> a, ffi::Buffer<dt> sa, ffi::Buffer<dt> b,
                      ffi::Buffer<dt> sb, ffi::ResultBuffer<dt> out) {
  using T = ffi::NativeType<dt>;
  const auto dims = a.dimensions();
  const int64_t m = dims[0], C = dims[1], groups = out->dimensions()[0];
  if (ffi::Error error = CheckShapes(C, groups); error.failure()) return error;
  const int64_t g = C / groups, size = groups * g * (g + 1), chunk = ChunkRows(m, C);
  const int64_t num_chunks = std::max<int64_t>(1, (m + chunk - 1) / chunk);
  std::vector<T> partial(num_chunks * size, T(0));
  ParallelChunks(pool, m, chunk, [&](int64_t r0, int64_t r1, int64_t c) {
    CrossRows<T>(a.typed_data(), sa.typed_data(), b.typed_data(), sb.typed_data(), C, groups, g, r0, r1,
                 partial.data() + c * size);
  });
  T* o = out->typed_data();
  std::copy(partial.begin(), partial.begin() + size, o);
  for (int64_t c = 1; c < num_chunks; ++c)
    for (int64_t k = 0; k < size; ++k) o[k] += partial[c * size + k];
  return ffi::Error::Success();
}

// out = (a − sa) Aᵀ [+ (b − sb) Bᵀ] + offset over all rows; b, sb, Bt are null for one term.
template <typename T, bool kTwo>
ffi::Error RunTransform(ffi::ThreadPool& pool, const ffi::AnyBuffer::Dimensions& dims, int64_t groups,
                        const T* a, const T* sa, const T* At, const T* b, const T* sb, const T* Bt,
                        const T* offset, T* out) {
  const int64_t m = dims[0], C = dims[1];
  if (ffi::Error error = CheckShapes(C, groups); error.failure()) return error;
  ParallelChunks(pool, m, ChunkRows(m, C), [&](int64_t r0, int64_t r1, int64_t) {
    TransformRows<T, kTwo>(a, sa, At, b, sb, Bt, offset, C, groups, C / groups, r0, r1, out);
  });
  return ffi::Error::Success();
}

template <ffi::DataType dt>
ffi::Error GroupTransform(ffi::ThreadPool pool, ffi::Buffer<dt> a, ffi::Buffer<dt> sa, ffi::Buffer<dt> At,
                          ffi::Buffer<dt> offset, ffi::ResultBuffer<dt> out) {
  return RunTransform<ffi::NativeType<dt>, false>(pool, a.dimensions(), At.dimensions()[0], a.typed_data(),
                                                  sa.typed_data(), At.typed_data(), nullptr, nullptr, nullptr,
                                                  offset.typed_data(), out->typed_data());
}

template <ffi::DataType dt>
ffi::Error GroupTransform2(ffi::ThreadPool pool, ffi::Buffer<dt> a, ffi::Buffer<dt> sa, ffi::Buffer<dt> At,
                           ffi::Buffer<dt> b, ffi::Buffer<dt> sb, ffi::Buffer<dt> Bt, ffi::Buffer<dt> offset,
                           ffi::ResultBuffer<dt> out) {
  return RunTransform<ffi::NativeType<dt>, true>(pool, a.dimensions(), At.dimensions()[0], a.typed_data(),
                                                 sa.typed_data(), At.typed_data(), b.typed_data(),
                                                 sb.typed_data(), Bt.typed_data(), offset.typed_data(),
                                                 out->typed_data());
}

}  // namespace

#define BW_ARG(dt) .Arg<ffi::Buffer<dt>>()
#define BW_CROSS(name, dt)                                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, GroupCross<dt>, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()     \
                                    BW_ARG(dt) BW_ARG(dt) BW_ARG(dt) BW_ARG(dt).Ret<ffi::Buffer<dt>>())
#define BW_TRANSFORM(name, dt)                                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, GroupTransform<dt>, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() \
                                    BW_ARG(dt) BW_ARG(dt) BW_ARG(dt) BW_ARG(dt).Ret<ffi::Buffer<dt>>())
#define BW_TRANSFORM2(name, dt)                                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, GroupTransform2<dt>, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() \
                                    BW_ARG(dt) BW_ARG(dt) BW_ARG(dt) BW_ARG(dt) BW_ARG(dt) BW_ARG(dt) \
                                    BW_ARG(dt).Ret<ffi::Buffer<dt>>())

BW_CROSS(BwGroupCrossF32, ffi::DataType::F32);
BW_CROSS(BwGroupCrossF64, ffi::DataType::F64);
BW_TRANSFORM(BwGroupTransformF32, ffi::DataType::F32);
BW_TRANSFORM(BwGroupTransformF64, ffi::DataType::F64);
BW_TRANSFORM2(BwGroupTransform2F32, ffi::DataType::F32);
BW_TRANSFORM2(BwGroupTransform2F64, ffi::DataType::F64);
