// Elementwise maps over contiguous runs for the CPU kernels: out[i] = f(in[i]) and
// out[i] = f(a[i], b[i]), with f working in float (double for double).
//
// PyTorch compiles its CPU kernels once per instruction set and picks one at run time; an extension
// is compiled once, for the baseline x86-64. So each map has a baseline copy and an AVX2+FMA+F16C
// copy (GCC's target attribute: the same C++ code, vectorised 8 floats wide), chosen by a CPUID
// check. Half and bfloat16 runs are converted to float in chunks that stay in L1, so the
// arithmetic loop vectorises; the conversions round to nearest even exactly as c10's do, so the
// results are bit-identical to ATen's.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define CNNKERNELS_X86 1
#define CNNKERNELS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CNNKERNELS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"), \
                 optimize("prefer-vector-width=512")))
#else
#define CNNKERNELS_X86 0
#define CNNKERNELS_TARGET_AVX2
#define CNNKERNELS_TARGET_AVX512
#endif

#define CNNKERNELS_ALWAYS_INLINE inline __attribute__((always_inline))
// A lambda inlined into its (ISA-targeted) caller, so its loops vectorise for that ISA.
#define CNNKERNELS_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace cnnkernels::cpu {

// ATEN_CPU_CAPABILITY caps ATen's kernels at "default" (no vector ISA), "avx2" or "avx512"; ours
// honour the same cap, so that one AVX-512 machine can run (and test) every copy of our kernels,
// and a capped process compares like with like.
inline bool capability_allows(const char* isa) {
  static const std::string cap = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    return std::string(env ? env : "");
  }();
  if (cap == "default") return false;
  if (cap == "avx2") return std::string(isa) == "avx2";
  return true;
}

inline bool has_avx512() {
#if CNNKERNELS_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          capability_allows("avx512");
  return yes;
#else
  return false;
#endif
}

inline bool has_avx2() {
#if CNNKERNELS_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && capability_allows("avx2");
  return yes;
#else
  return false;
#endif
}

constexpr int64_t kChunk = 256;  // floats per conversion buffer: 1 KiB, well inside L1

template <typename T>
constexpr bool is_reduced_float = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// --- conversions, bit-exact with c10 -----------------------------------------------------------

CNNKERNELS_ALWAYS_INLINE float bf16_to_float(c10::BFloat16 v) {
  return c10::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
}

CNNKERNELS_ALWAYS_INLINE c10::BFloat16 float_to_bf16(float f) {
  const uint32_t u = c10::bit_cast<uint32_t>(f);
  const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1) + UINT32_C(0x7FFF)) >> 16);
  return c10::BFloat16(f != f ? UINT16_C(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

#if CNNKERNELS_X86
CNNKERNELS_TARGET_AVX2 inline void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

CNNKERNELS_TARGET_AVX2 inline void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#endif

template <bool kAvx2, typename T>
CNNKERNELS_ALWAYS_INLINE void load_floats(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
#if CNNKERNELS_X86
    if constexpr (kAvx2) {
      half_to_float_f16c(src, dst, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <bool kAvx2, typename T>
CNNKERNELS_ALWAYS_INLINE void store_floats(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  } else {
#if CNNKERNELS_X86
    if constexpr (kAvx2) {
      float_to_half_f16c(src, dst, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
  }
}

// --- the maps ----------------------------------------------------------------------------------

// Out-of-place maps may write their output with non-temporal (streaming) stores. A normal store to
// memory that is not in cache first reads the line ("read for ownership"), so an elementwise op over
// tensors larger than the last-level cache moves 3 bytes per input/output byte pair instead of 2;
// streaming stores skip that read. When everything the op touches fits in the cache, normal stores
// are better (the next op finds the output there), so callers stream only above that size.
// The cache one core's working set can live in. Not sysconf(_SC_LEVEL3_CACHE_SIZE): in VMs it reports
// the host's summed L3 (320 MiB on the 2-vCPU EPYC we measure on, whose CCX has 32 MiB). 32 MiB is the
// L3 of one AMD CCX and about that of a recent Intel socket slice; measured on that EPYC, streaming
// an op touching 24 MB was 25% slower and one touching 48 MB 12% faster.
constexpr int64_t kStreamingThresholdBytes = int64_t(32) << 20;

// Whether an op that reads and writes `bytes_touched` bytes in all should stream its output.
inline bool streaming_pays_off(int64_t bytes_touched) {
  return bytes_touched > kStreamingThresholdBytes;
}

#if CNNKERNELS_X86
CNNKERNELS_TARGET_AVX2 inline void stream_chunk_avx2(const void* src, void* dst, int64_t bytes) {
  auto* d = reinterpret_cast<__m256i*>(dst);
  const auto* s = reinterpret_cast<const __m256i*>(src);
  for (int64_t i = 0; i < bytes / 32; ++i) _mm256_stream_si256(d + i, _mm256_loadu_si256(s + i));
}
#endif

template <bool kAvx2>
CNNKERNELS_ALWAYS_INLINE void stream_chunk(const void* src, void* dst, int64_t bytes) {
#if CNNKERNELS_X86
  if constexpr (kAvx2) {
    stream_chunk_avx2(src, dst, bytes);
    return;
  }
#endif
  __builtin_memcpy(dst, src, bytes);
}

// Elements before `out` reaches a 32-byte boundary.
template <typename T>
CNNKERNELS_ALWAYS_INLINE int64_t head_to_alignment(const T* out, int64_t n) {
  const auto misalignment = reinterpret_cast<uintptr_t>(out) % 32;
  if (misalignment % sizeof(T) != 0) return n;  // never aligns: no streaming
  const int64_t head = misalignment == 0 ? 0 : static_cast<int64_t>((32 - misalignment) / sizeof(T));
  return head < n ? head : n;
}

// Streaming needs the vector ISA, a separate output (in place, the line is in cache already) and a
// run long enough to amortise the aligned head and tail.
template <bool kAvx2, typename T>
CNNKERNELS_ALWAYS_INLINE bool should_stream(bool stream, const void* in, const T* out, int64_t n) {
  return kAvx2 && stream && in != static_cast<const void*>(out) && n >= 4 * kChunk;
}

template <bool kAvx2, typename T, typename F>
CNNKERNELS_ALWAYS_INLINE void map1_plain(const T* x, T* out, int64_t n, const F& f) {
  if constexpr (is_reduced_float<T>) {
    float buf[kChunk];
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t m = n - start < kChunk ? n - start : kChunk;
      load_floats<kAvx2>(x + start, buf, m);
      for (int64_t i = 0; i < m; ++i) buf[i] = f(buf[i]);
      store_floats<kAvx2>(buf, out + start, m);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(x[i]);
  }
}

// Writes out[0, n) with streaming stores: run(offset, dst, count) computes elements
// [offset, offset + count) into dst. The unaligned head and the tail are computed in place; the
// aligned middle goes through an L1 chunk that is then streamed out.
template <bool kAvx2, typename T, typename Run>
CNNKERNELS_ALWAYS_INLINE void streamed(T* out, int64_t n, const Run& run) {
  const int64_t head = head_to_alignment(out, n);
  run(0, out, head);
  alignas(64) T chunk[kChunk];  // kChunk elements of T: a multiple of 32 bytes
  int64_t i = head;
  for (; i + kChunk <= n; i += kChunk) {
    run(i, chunk, kChunk);
    stream_chunk<kAvx2>(chunk, out + i, kChunk * sizeof(T));
  }
#if CNNKERNELS_X86
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the op returns
#endif
  run(i, out + i, n - i);
}

template <bool kAvx2, typename T, typename F>
CNNKERNELS_ALWAYS_INLINE void map1_body(const T* x, T* out, int64_t n, const F& f, bool stream) {
  if (should_stream<kAvx2>(stream, x, out, n)) {
    streamed<kAvx2>(out, n, [&](int64_t offset, T* dst, int64_t count) CNNKERNELS_ALWAYS_INLINE_LAMBDA {
      map1_plain<kAvx2>(x + offset, dst, count, f);
    });
  } else {
    map1_plain<kAvx2>(x, out, n, f);
  }
}

template <bool kAvx2, typename T, typename F>
CNNKERNELS_ALWAYS_INLINE void map2_plain(const T* a, const T* b, T* out, int64_t n, const F& f) {
  if constexpr (is_reduced_float<T>) {
    float buf_a[kChunk];
    float buf_b[kChunk];
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t m = n - start < kChunk ? n - start : kChunk;
      load_floats<kAvx2>(a + start, buf_a, m);
      load_floats<kAvx2>(b + start, buf_b, m);
      for (int64_t i = 0; i < m; ++i) buf_a[i] = f(buf_a[i], buf_b[i]);
      store_floats<kAvx2>(buf_a, out + start, m);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], b[i]);
  }
}

template <bool kAvx2, typename T, typename F>
CNNKERNELS_ALWAYS_INLINE void map2_body(const T* a, const T* b, T* out, int64_t n, const F& f,
                                        bool stream) {
  if (should_stream<kAvx2>(stream, a, out, n) && static_cast<const void*>(b) != out) {
    streamed<kAvx2>(out, n, [&](int64_t offset, T* dst, int64_t count) CNNKERNELS_ALWAYS_INLINE_LAMBDA {
      map2_plain<kAvx2>(a + offset, b + offset, dst, count, f);
    });
  } else {
    map2_plain<kAvx2>(a, b, out, n, f);
  }
}

template <typename T, typename F>
CNNKERNELS_TARGET_AVX2 void map1_avx2(const T* x, T* out, int64_t n, F f, bool stream) {
  map1_body<true>(x, out, n, f, stream);
}
template <typename T, typename F>
CNNKERNELS_TARGET_AVX512 void map1_avx512(const T* x, T* out, int64_t n, F f, bool stream) {
  map1_body<true>(x, out, n, f, stream);
}
template <typename T, typename F>
CNNKERNELS_TARGET_AVX512 void map2_avx512(const T* a, const T* b, T* out, int64_t n, F f, bool stream) {
  map2_body<true>(a, b, out, n, f, stream);
}
template <typename T, typename F>
void map1_baseline(const T* x, T* out, int64_t n, F f, bool stream) {
  map1_body<false>(x, out, n, f, stream);
}
template <typename T, typename F>
CNNKERNELS_TARGET_AVX2 void map2_avx2(const T* a, const T* b, T* out, int64_t n, F f, bool stream) {
  map2_body<true>(a, b, out, n, f, stream);
}
template <typename T, typename F>
void map2_baseline(const T* a, const T* b, T* out, int64_t n, F f, bool stream) {
  map2_body<false>(a, b, out, n, f, stream);
}

// Runs f() compiled for the best instruction set this CPU has. `flatten` inlines everything f
// calls into the target-specific copy, so loops anywhere below f are vectorised for that ISA.
// Each lambda type gets its own three copies: wrap a whole task (e.g. the body of a
// parallel_for), not an inner loop.
template <typename F>
__attribute__((flatten)) CNNKERNELS_TARGET_AVX512 void run_avx512(const F& f) { f(); }
template <typename F>
__attribute__((flatten)) CNNKERNELS_TARGET_AVX2 void run_avx2(const F& f) { f(); }
template <typename F>
__attribute__((flatten)) void run_baseline(const F& f) { f(); }

template <typename F>
void run_with_best_isa(const F& f) {
  if (has_avx512()) {
    run_avx512(f);
  } else if (has_avx2()) {
    run_avx2(f);
  } else {
    run_baseline(f);
  }
}

// As run_with_best_isa, for code that must know at compile time whether the vector ISA is there
// (the F16C half conversions of load_floats/store_floats): f(std::bool_constant<kAvx2>{}).
template <typename F>
__attribute__((flatten)) CNNKERNELS_TARGET_AVX512 void run_avx512_flag(const F& f) { f(std::true_type{}); }
template <typename F>
__attribute__((flatten)) CNNKERNELS_TARGET_AVX2 void run_avx2_flag(const F& f) { f(std::true_type{}); }
template <typename F>
__attribute__((flatten)) void run_baseline_flag(const F& f) { f(std::false_type{}); }

template <typename F>
void run_with_best_isa_flag(const F& f) {
  if (has_avx512()) {
    run_avx512_flag(f);
  } else if (has_avx2()) {
    run_avx2_flag(f);
  } else {
    run_baseline_flag(f);
  }
}

// out[i] = f(x[i]); `out` may equal `x`. f takes and returns float (double for double).
// `stream`: write `out` with streaming stores (see streaming_pays_off).
template <typename T, typename F>
void map1(const T* x, T* out, int64_t n, F f, bool stream = false) {
  if (has_avx512()) {
    map1_avx512(x, out, n, f, stream);
  } else if (has_avx2()) {
    map1_avx2(x, out, n, f, stream);
  } else {
    map1_baseline(x, out, n, f, stream);
  }
}

// out[i] = f(a[i], b[i]).
template <typename T, typename F>
void map2(const T* a, const T* b, T* out, int64_t n, F f, bool stream = false) {
  if (has_avx512()) {
    map2_avx512(a, b, out, n, f, stream);
  } else if (has_avx2()) {
    map2_avx2(a, b, out, n, f, stream);
  } else {
    map2_baseline(a, b, out, n, f, stream);
  }
}

}  // namespace cnnkernels::cpu
