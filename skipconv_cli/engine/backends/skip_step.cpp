// One Skip-Conv frame of one layer on the CPU, in a single call: residual norm, gate, reference update,
// gather of the active tiles, one batched oneDNN convolution, write-back. See native.py for the why.
//
// Layout: every map is channels_last (a pixel is C contiguous floats), so the residual, the reference
// update, the gather and the write-back are all contiguous row copies. The state keeps the reference input
// padded (x_pad, zero borders) and the output z = W * x_ref + b.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Rows handed to one thread at least: below this a map is walked serially (thread start-up costs more).
constexpr int64_t kGrainElements = 1 << 14;
// A full scan runs in at most this many bands, one per this many grains of the input at least (each band
// starts two parallel loops: small maps scan in one).
constexpr int64_t kScanBands = 4;
constexpr int64_t kGrainsPerBand = 8;

int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_row));
}

// Work (elements touched) below which a pass runs on the calling thread: a fork costs ~1 us with the
// threads spinning and ~4 us after Python ran between two calls (measured on 2 threads), about this much
// work.
constexpr int64_t kSerialWork = kGrainElements / 4;

// The grain of a pass over `rows` rows whose work (elements touched) is estimated: all of them (the pass
// runs on the calling thread: at::parallel_for and parallel_reduce run a range no larger than the grain
// inline) unless the work is worth waking the threads, else `grain`. An incremental step's passes touch a
// few rows of the map: split by the map's size, they paid the fork for next to nothing.
int64_t grain_for(int64_t rows, int64_t grain, int64_t work) { return work < kSerialWork ? rows : grain; }

// Asks memory for `count` floats from `first` on, ahead of a pass that reads them at scattered pixels.
inline void prefetch_floats(const float* first, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(first);
  for (int64_t offset = 0; offset < count * int64_t(sizeof(float)); offset += 64)
    __builtin_prefetch(bytes + offset);
}

// Buffers the pixel path reuses from call to call (per slot, grown as needed up to kScratchFloats): a fresh
// gathered matrix of a few MB per layer and frame came back from the allocator as new pages, whose faults
// cost about as much as the gather's copies (HRNet-w32's 256->32 layer: 3.4 MB a frame). Larger ones are
// allocated for the call. Steps run one at a time (called from Python, which holds the GIL throughout).
constexpr int64_t kScratchFloats = int64_t(4) << 20;

at::Tensor scratch(int slot, int64_t floats) {
  if (floats > kScratchFloats) return at::empty({floats}, at::kFloat);
  static at::Tensor* buffers = new at::Tensor[2];  // (never destroyed: no teardown order at exit)
  at::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < floats)
    buffer = at::empty({std::min(kScratchFloats, std::max(floats, 2 * (buffer.defined() ? buffer.numel() : 0)))},
                       at::kFloat);
  return buffer;  // (at least `floats` long: a narrowed view cost ~2.4 us of dispatch, a few hundred a frame)
}

// The pixel path's matrix product on CPUs with AVX-512: receptive fields (read in place) times the weight,
// packed once per weight in panels of 16 output channels ([ceil(Co / 16), K, 16], zero padded), a
// 6-row x 32-channel register tile per step. at::mm (MKL) ran the same products at 0.3-0.5x this speed on
// the AMD EPYC these numbers come from (MKL takes its AVX2 code there: ~90 GMAC/s on 2 threads against
// ~245 here, and ~200 for oneDNN's dense convolution), 2-7x on the few-row products of a calm frame.
// Compiled for AVX-512 function by function and chosen at run time (has_avx512): the extension runs on any
// x86 CPU. CPUs with AVX2 and FMA but no AVX-512 (AMD before Zen 4, Intel's client cores) run the same
// product on weights packed in panels of 8 (one AVX2 register), a 6-row x 16-channel tile: the same code
// written for 8-float registers (the *_avx2 functions below).

// What the product's rows get before they are stored: the bias added, then clamped to [lo, hi] (a fused
// ReLU/ReLU6) when `clamp`.
struct Epilogue {
  const float* bias;
  bool clamp;
  float lo, hi;
};

constexpr int kRows = 6;  // rows per micro-tile: 6 rows x 2 panels = 12 accumulators

#if defined(__x86_64__)
constexpr int64_t kPanel = 16;  // output channels per weight panel: one AVX-512 register of floats

// rows [R] x segments: row r's k-th value is segments[r * count + k / length][k % length]; row r of the
// result goes to out[r] + col0 (channels col0 .. col0 + cols)
template <int R, int P>
__attribute__((target("avx512f"))) void packed_tile(const float* const* segments, int64_t count,
                                                    int64_t length, const float* panel, int64_t K,
                                                    float* const* out, int64_t col0, int64_t cols,
                                                    const Epilogue& epilogue) {
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t s = 0; s < count; ++s) {
    const float* row[R];
    for (int r = 0; r < R; ++r) row[r] = segments[r * count + s];
    const float* w = panel + s * length * kPanel;
    for (int64_t k = 0; k < length; ++k) {
      __m512 weights[P];
      for (int p = 0; p < P; ++p) weights[p] = _mm512_loadu_ps(w + (p * K + k) * kPanel);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(row[r][k]);
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(x, weights[p], acc[r][p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t left = cols - p * kPanel, col = col0 + p * kPanel;
    const __mmask16 mask = left >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 bias = epilogue.bias ? _mm512_maskz_loadu_ps(mask, epilogue.bias + col) : _mm512_setzero_ps();
    const __m512 lo = _mm512_set1_ps(epilogue.lo), hi = _mm512_set1_ps(epilogue.hi);
    for (int r = 0; r < R; ++r) {
      __m512 value = _mm512_add_ps(acc[r][p], bias);
      if (epilogue.clamp) value = _mm512_min_ps(_mm512_max_ps(value, lo), hi);
      _mm512_mask_storeu_ps(out[r] + col, mask, value);
    }
  }
}

template <int P>
__attribute__((target("avx512f"))) void packed_rows(const float* const* segments, int64_t count,
                                                    int64_t length, int64_t rows, const float* panel,
                                                    int64_t K, float* const* out, int64_t col0,
                                                    int64_t cols, const Epilogue& epilogue) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    packed_tile<kRows, P>(segments + r * count, count, length, panel, K, out + r, col0, cols, epilogue);
  const float* const* rest = segments + r * count;
  float* const* to = out + r;
  switch (rows - r) {
    case 5: packed_tile<5, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 4: packed_tile<4, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 3: packed_tile<3, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 2: packed_tile<2, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 1: packed_tile<1, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    default: break;
  }
}

// One depthwise output pixel: acc[C] = bias + sum over taps of weight[tap] * tap_rows[tap], 16 channels at a
// time in a register (the loop compiled for the baseline x86-64 ran 4 floats at a time).
__attribute__((target("avx512f"))) void depthwise_pixel(float* acc, const float* bias, const float* weight,
                                                        const float* const* tap_rows, int64_t taps,
                                                        int64_t C) {
  for (int64_t ch = 0; ch < C; ch += kPanel) {
    const int64_t left = C - ch;
    const __mmask16 mask = left >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    __m512 sum = bias ? _mm512_maskz_loadu_ps(mask, bias + ch) : _mm512_setzero_ps();
    for (int64_t t = 0; t < taps; ++t)
      sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, tap_rows[t] + ch),
                            _mm512_maskz_loadu_ps(mask, weight + t * C + ch), sum);
    _mm512_mask_storeu_ps(acc + ch, mask, sum);
  }
}

bool has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

constexpr int64_t kPanel8 = 8;  // output channels per AVX2 weight panel: one 256-bit register of floats

// The first `count` (0-8) lanes on: AVX2's masked loads and stores take a vector of lane masks.
__attribute__((target("avx2"))) inline __m256i lanes(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, kPanel8))), index);
}

// packed_tile for AVX2: panels of 8 channels, R rows x P panels of accumulators (6 x 2 = 12 of the 16
// registers)
template <int R, int P>
__attribute__((target("avx2,fma"))) void packed_tile_avx2(const float* const* segments, int64_t count,
                                                          int64_t length, const float* panel, int64_t K,
                                                          float* const* out, int64_t col0, int64_t cols,
                                                          const Epilogue& epilogue) {
  __m256 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
  for (int64_t s = 0; s < count; ++s) {
    const float* row[R];
    for (int r = 0; r < R; ++r) row[r] = segments[r * count + s];
    const float* w = panel + s * length * kPanel8;
    for (int64_t k = 0; k < length; ++k) {
      __m256 weights[P];
      for (int p = 0; p < P; ++p) weights[p] = _mm256_loadu_ps(w + (p * K + k) * kPanel8);
      for (int r = 0; r < R; ++r) {
        const __m256 x = _mm256_set1_ps(row[r][k]);  // (_mm256_broadcast_ss's pointer kept acc in memory)
        for (int p = 0; p < P; ++p) acc[r][p] = _mm256_fmadd_ps(x, weights[p], acc[r][p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t col = col0 + p * kPanel8;
    const __m256i mask = lanes(cols - p * kPanel8);
    const __m256 bias = epilogue.bias ? _mm256_maskload_ps(epilogue.bias + col, mask) : _mm256_setzero_ps();
    const __m256 lo = _mm256_set1_ps(epilogue.lo), hi = _mm256_set1_ps(epilogue.hi);
    for (int r = 0; r < R; ++r) {
      __m256 value = _mm256_add_ps(acc[r][p], bias);
      if (epilogue.clamp) value = _mm256_min_ps(_mm256_max_ps(value, lo), hi);
      _mm256_maskstore_ps(out[r] + col, mask, value);
    }
  }
}

template <int P>
__attribute__((target("avx2,fma"))) void packed_rows_avx2(const float* const* segments, int64_t count,
                                                          int64_t length, int64_t rows, const float* panel,
                                                          int64_t K, float* const* out, int64_t col0,
                                                          int64_t cols, const Epilogue& epilogue) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    packed_tile_avx2<kRows, P>(segments + r * count, count, length, panel, K, out + r, col0, cols, epilogue);
  const float* const* rest = segments + r * count;
  float* const* to = out + r;
  switch (rows - r) {
    case 5: packed_tile_avx2<5, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 4: packed_tile_avx2<4, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 3: packed_tile_avx2<3, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 2: packed_tile_avx2<2, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    case 1: packed_tile_avx2<1, P>(rest, count, length, panel, K, to, col0, cols, epilogue); break;
    default: break;
  }
}

// depthwise_pixel for AVX2: 8 channels a register
__attribute__((target("avx2,fma"))) void depthwise_pixel_avx2(float* acc, const float* bias,
                                                              const float* weight, const float* const* tap_rows,
                                                              int64_t taps, int64_t C) {
  for (int64_t ch = 0; ch < C; ch += kPanel8) {
    const __m256i mask = lanes(C - ch);
    __m256 sum = bias ? _mm256_maskload_ps(bias + ch, mask) : _mm256_setzero_ps();
    for (int64_t t = 0; t < taps; ++t)
      sum = _mm256_fmadd_ps(_mm256_maskload_ps(tap_rows[t] + ch, mask),
                            _mm256_maskload_ps(weight + t * C + ch, mask), sum);
    _mm256_maskstore_ps(acc + ch, mask, sum);
  }
}

bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#else
void depthwise_pixel(float*, const float*, const float*, const float* const*, int64_t, int64_t) {}
void depthwise_pixel_avx2(float*, const float*, const float*, const float* const*, int64_t, int64_t) {}
constexpr int64_t kPanel = 16;
constexpr int64_t kPanel8 = 8;
template <int P>
void packed_rows(const float* const*, int64_t, int64_t, int64_t, const float*, int64_t, float* const*,
                 int64_t, int64_t, const Epilogue&) {}
template <int P>
void packed_rows_avx2(const float* const*, int64_t, int64_t, int64_t, const float*, int64_t, float* const*,
                      int64_t, int64_t, const Epilogue&) {}
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

// Floats per vector register of the widest of the kernels above this CPU runs: 16 (AVX-512), 8 (AVX2 with
// FMA), 0 (neither: at::mm and loops compiled for the baseline ISA).
int64_t vector_width() { return has_avx512() ? kPanel : has_avx2() ? kPanel8 : 0; }

// out[i][0 .. Co) = epilogue(a[i] x W^T) for the m rows, where row i of a is the concatenation of the
// `count` segments of `length` floats that segments[i * count ...] point to (a receptive field's rows in the
// padded input, read where they lie: no gathered copy), and packed holds W [Co, K] as panels
// [ceil(Co / width), K, width] (zero padded; width 16: the AVX-512 kernel, 8: AVX2's). out[i] may be the
// output pixel's row itself: no write-back pass.
void packed_gemm(const float* const* segments, int64_t count, int64_t length, int64_t m,
                 const float* packed, int64_t width, int64_t Co, float* const* out, const Epilogue& epilogue) {
  const int64_t K = count * length;
  const int64_t panels = (Co + width - 1) / width, pairs = (panels + 1) / 2;
  const int64_t row_blocks = (m + 4 * kRows - 1) / (4 * kRows);  // 24 rows per work item
  const int64_t items = pairs * row_blocks;
  const int64_t work = m * K * Co;
  // panel-pair-major: each thread keeps to a few panels of the weight, which stay in its L2
  at::parallel_for(0, items, work < (int64_t(1) << 18) ? items : 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / row_blocks, block = item % row_blocks;
      const int64_t r0 = block * 4 * kRows, rows = std::min<int64_t>(4 * kRows, m - r0);
      const int64_t col0 = pair * 2 * width, cols = std::min<int64_t>(2 * width, Co - col0);
      const float* panel = packed + pair * 2 * K * width;
      const float* const* first = segments + r0 * count;
      float* const* to = out + r0;
      if (width == kPanel) {
        if (cols > width) packed_rows<2>(first, count, length, rows, panel, K, to, col0, cols, epilogue);
        else packed_rows<1>(first, count, length, rows, panel, K, to, col0, cols, epilogue);
      } else {
        if (cols > width) packed_rows_avx2<2>(first, count, length, rows, panel, K, to, col0, cols, epilogue);
        else packed_rows_avx2<1>(first, count, length, rows, panel, K, to, col0, cols, epilogue);
      }
    }
  });
}

struct Geometry {
  int64_t n, c, h, w, hp, wp, co, ho, wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Folds op over the one-channel map's values under the kernel taps of output (oy, ox) (zero padding: taps
// outside the map are left out).
template <typename T, typename Acc, typename Op>
inline Acc fold_taps(const T* map, const Geometry& g, int64_t oy, int64_t ox, Acc init, Op op) {
  const int64_t y0 = oy * g.sh - g.ph, x0 = ox * g.sw - g.pw;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t y = y0 + ky * g.dh;
    if (y < 0 || y >= g.h) continue;
    const T* row = map + y * g.w;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t x = x0 + kx * g.dw;
      if (x >= 0 && x < g.w) init = op(init, row[x]);
    }
  }
  return init;
}

// support[oy, ox]: the sum of the map over the taps of output (oy, ox)
inline float support_at(const float* map, const Geometry& g, int64_t oy, int64_t ox) {
  return fold_taps(map, g, oy, ox, 0.f, [](float a, float b) { return a + b; });
}

}  // namespace

// What a fused activation (the op that consumed the layer's output alone) does to a written output row.
enum Activation : int64_t { kNone = 0, kClamp = 1, kSilu = 2 };

inline void write_row(float* dst, const float* src, int64_t count, int64_t act, float lo, float hi) {
  if (act == kClamp) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = std::min(std::max(src[i], lo), hi);
  } else if (act == kSilu) {
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i] / (1.f + std::exp(-src[i]));
  } else {
    std::memcpy(dst, src, count * sizeof(float));
  }
}

// dst = activation(x + y) over count floats
inline void add_row(float* dst, const float* x, const float* y, int64_t count, int64_t act, float lo,
                    float hi) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = x[i] + y[i];
  if (act != kNone) write_row(dst, dst, count, act, lo, hi);  // in place, the row in L1
}

// write_row of src + bias (bias: optional, count floats)
inline void write_row(float* dst, const float* src, const float* bias, int64_t count, int64_t act, float lo,
                      float hi) {
  if (!bias) return write_row(dst, src, count, act, lo, hi);
  if (act == kClamp) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = std::min(std::max(src[i] + bias[i], lo), hi);
  } else if (act == kSilu) {
    for (int64_t i = 0; i < count; ++i) {
      const float v = src[i] + bias[i];
      dst[i] = v / (1.f + std::exp(-v));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i] + bias[i];
  }
}

// Returns {active units, computed outputs, path, outputs run} where units are execution tiles, or blocks on
// the pixel path, path is 0 idle, 1 sparse, 2 busy (a larger fraction of units active than the crossover:
// nothing is updated, the caller takes the whole frame; every block counts as gated, and the units counted
// are those found before the scan stopped), 3 forced (timing only: the outputs of the given units, flat
// indices, are recomputed and written whole; the reference is not touched), and outputs run counts what the
// convolution computed (halo and overlap of tiles included).
// pixel_weight (optional): recompute output pixels instead of tiles. Ungrouped convs (float [Co, kh * kw *
// C], the channels_last weight's own memory, or its packed panels, see packed_gemm): the written outputs'
// receptive fields (those pixels only) times the weight in one matrix product. Depthwise convs (float
// [kh * kw, C]): per pixel, the taps' channel rows times their weights, summed in registers. No tile covers
// more than its gated blocks, no halo is convolved, and nothing builds a kernel per batch size as oneDNN's
// convolution does. vectors: floats per register of the kernels to run, 16 (AVX-512), 8 (AVX2) or 0 (at::mm
// and loops compiled for the baseline ISA); packed panels are as wide (native.vector_width).
// channel_weights (float [C], optional): a learned gate's positive weights on |x - x_ref| per channel.
// activation (an Activation) with bounds lo, hi (clamp): applied to every written output, so that z holds
// the activated output and the activation follows the sparsity.
//
// gate (uint8 [N, Hb, Wb]) receives the gate per block, mark (uint8 [N, Ho, Wo]) per output: 0 untouched,
// 1 in the footprint of an updated input, 2 the same with a changed input under its support (only those
// are written: elsewhere a recomputation would only add rounding noise).
std::vector<int64_t> skip_step(
    const at::Tensor& input, at::Tensor& x_pad, at::Tensor& z, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation, double act_lo,
    double act_hi, const at::Tensor& thresholds,
    const c10::optional<at::Tensor>& channel_weights, int64_t block, const at::Tensor& row_owner,
    const at::Tensor& col_owner, const at::Tensor& tile_rows, const at::Tensor& tile_cols, int64_t tile,
    int64_t tile_h, int64_t tile_w, double crossover, at::Tensor& gate, at::Tensor& mark,
    at::Tensor& r_abs, at::Tensor& owned, const c10::optional<at::Tensor>& forced_tiles,
    bool incremental, const c10::optional<at::Tensor>& input_marks,
    const c10::optional<at::Tensor>& pixel_weight, int64_t vectors) {
  TORCH_CHECK(vectors == 0 || vectors <= vector_width(), "skip_step: this CPU has no ", vectors,
              "-float vector kernels");
  // (made channels_last here, where it costs a flag check, not in Python: ~1 us a call there)
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "skip_step: x must be float32");
  TORCH_CHECK(x_pad.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  z.is_contiguous(at::MemoryFormat::ChannelsLast),
              "skip_step: state must be channels_last");
  Geometry g{x.size(0),      x.size(1),    x.size(2),   x.size(3),   x_pad.size(2), x_pad.size(3),
             z.size(1),      z.size(2),    z.size(3),   kernel[0],   kernel[1],     stride[0],
             stride[1],      padding[0],   padding[1],  dilation[0], dilation[1]};
  const int64_t hb = gate.size(1), wb = gate.size(2);
  const int64_t ty_count = tile_rows.size(0), tx_count = tile_cols.size(0);
  const int64_t blocks_per_tile = tile / block;
  const float* xd = x.data_ptr<float>();
  float* pad = x_pad.data_ptr<float>();
  float* zd = z.data_ptr<float>();
  float* rd = r_abs.data_ptr<float>();
  uint8_t* gd = gate.data_ptr<uint8_t>();
  uint8_t* md = mark.data_ptr<uint8_t>();
  uint8_t* od = owned.data_ptr<uint8_t>();
  const float* thr = thresholds.data_ptr<float>();
  const int64_t* rown = row_owner.data_ptr<int64_t>();
  const int64_t* cown = col_owner.data_ptr<int64_t>();
  const int64_t* trow = tile_rows.data_ptr<int64_t>();
  const int64_t* tcol = tile_cols.data_ptr<int64_t>();
  const int64_t C = g.c, Co = g.co;
  const int64_t patch_h = (tile_h - 1) * g.sh + g.dh * (g.kh - 1) + 1;
  const int64_t patch_w = (tile_w - 1) * g.sw + g.dw * (g.kw - 1) + 1;
  auto pad_pixel = [&](int64_t n, int64_t y, int64_t xx) {
    return pad + ((n * g.hp + y) * g.wp + xx) * C;
  };

  // the active execution units: tiles, flat (n, ty, tx); on the pixel path blocks, flat (n, by, bx) (what
  // a pixel layer computes follows its blocks, not tiles: on an 8x8 map one 8x8 tile is the whole map)
  const bool pixel_path = pixel_weight.has_value();
  std::vector<int64_t> units;
  const bool forced = forced_tiles.has_value();
  const int64_t path = forced ? 3 : 1;
  // 1. per input pixel: |x - x_ref| summed over channels (weighted per channel for a learned gate; the
  // weights are positive, so the sum is zero exactly where the input did not change). Incremental: r_abs
  // still holds the last step's values, which stay right except where the layer before wrote since
  // (input_marks == 2; no marks: nothing was written) — the step keeps r_abs at 0 where it takes inputs.
  const float* cw = channel_weights.has_value() ? channel_weights->data_ptr<float>() : nullptr;
  const uint8_t* im = input_marks.has_value() ? input_marks->data_ptr<uint8_t>() : nullptr;
  auto residual_rows = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.h, y = row % g.h;
      const float* xr = xd + row * g.w * C;
      const float* rr = pad_pixel(n, y + g.ph, g.pw);
      float* out = rd + row * g.w;
      const uint8_t* mrow = incremental ? im + row * g.w : nullptr;
      if (mrow && !std::memchr(mrow, 2, g.w)) continue;  // (a row with no write: most, when few changed)
      if (mrow) {
        // the written pixels' references asked of memory first, all of them: state a frame old, out of
        // cache at scattered pixels, which the loop below otherwise waits for more or less one at a time
        // (HRNet-w32 at 4.3x fewer MACs: these residuals 2.3 -> 2.0 ms a frame, interleaved A/B)
        for (int64_t xx = 0; xx < g.w; ++xx)
          if (mrow[xx] == 2) prefetch_floats(rr + xx * C, C);
      }
      for (int64_t xx = 0; xx < g.w; ++xx) {
        if (mrow && mrow[xx] != 2) continue;
        float total = 0.f;
        const float* a = xr + xx * C;
        const float* b = rr + xx * C;
        if (cw) {
#pragma omp simd reduction(+ : total)
          for (int64_t ch = 0; ch < C; ++ch) total += cw[ch] * std::fabs(a[ch] - b[ch]);
        } else {
#pragma omp simd reduction(+ : total)
          for (int64_t ch = 0; ch < C; ++ch) total += std::fabs(a[ch] - b[ch]);
        }
        out[xx] = total;
      }
    }
  };
  // 2. gate per block: some output of the block has a support norm above its stream's threshold.
  // Incremental: a block's support norms changed only if it reads a marked pixel, or if it fired last step
  // (its owned inputs were taken); every other block keeps last step's decision, which was off.
  std::vector<uint8_t> dirty;
  int64_t marked = 0;  // input pixels written since the last step (incremental)
  if (incremental) {
    // Walked by runs of written pixels in each row: the outputs a run's taps may read span from its first
    // pixel's to its last's (per pixel, the bounds' divisions cost ~40 ns a written pixel: ~85 us a frame
    // for a 64x64 map after a busy layer). A superset for strided and dilated kernels, which is safe.
    dirty.assign(g.n * hb * wb, 0);
    for (int64_t n = 0; n < g.n && im; ++n) {
      for (int64_t y = 0; y < g.h; ++y) {
        const uint8_t* mrow = im + (n * g.h + y) * g.w;
        const void* hit = std::memchr(mrow, 2, g.w);
        if (!hit) continue;
        const int64_t oy0 = std::max<int64_t>(0, (y + g.ph - g.dh * (g.kh - 1) + g.sh - 1) / g.sh);
        const int64_t oy1 = std::min<int64_t>(g.ho - 1, (y + g.ph) / g.sh);
        int64_t xx = static_cast<const uint8_t*>(hit) - mrow;
        while (true) {
          const int64_t first = xx;
          while (xx < g.w && mrow[xx] == 2) ++xx;
          marked += xx - first;
          const int64_t ox0 = std::max<int64_t>(0, (first + g.pw - g.dw * (g.kw - 1) + g.sw - 1) / g.sw);
          const int64_t ox1 = std::min<int64_t>(g.wo - 1, (xx - 1 + g.pw) / g.sw);
          if (oy0 <= oy1 && ox0 <= ox1) {
            for (int64_t by = oy0 / block; by <= oy1 / block; ++by)
              std::memset(dirty.data() + (n * hb + by) * wb + ox0 / block, 1, ox1 / block - ox0 / block + 1);
          }
          if (xx >= g.w) break;
          hit = std::memchr(mrow + xx, 2, g.w - xx);
          if (!hit) break;
          xx = static_cast<const uint8_t*>(hit) - mrow;
        }
      }
    }
  }
  auto gate_rows = [&](int64_t begin, int64_t end) {
    for (int64_t brow = begin; brow < end; ++brow) {
      const int64_t n = brow / hb, by = brow % hb;
      const float* map = rd + n * g.h * g.w;
      uint8_t* grow = gd + brow * wb;
      const float limit = thr[n];
      for (int64_t bx = 0; bx < wb; ++bx) {
        const bool evaluate = !incremental || grow[bx] || dirty[brow * wb + bx];
        grow[bx] = 0;
        if (!evaluate) continue;
        for (int64_t oy = by * block; oy < std::min(g.ho, (by + 1) * block) && !grow[bx]; ++oy)
          for (int64_t ox = bx * block; ox < std::min(g.wo, (bx + 1) * block); ++ox)
            if (support_at(map, g, oy, ox) > limit) { grow[bx] = 1; break; }
      }
    }
  };
  // 3. the active units of tile rows [ty_begin, ty_end): execution tiles holding an active block, or the
  // active blocks of those rows (the last tile row's: every block row left)
  auto collect_units = [&](int64_t n, int64_t ty_begin, int64_t ty_end) {
    if (pixel_path) {
      const int64_t by_end = ty_end == ty_count ? hb : std::min(hb, ty_end * blocks_per_tile);
      for (int64_t by = std::min(hb, ty_begin * blocks_per_tile); by < by_end; ++by)
        for (int64_t bx = 0; bx < wb; ++bx)
          if (gd[(n * hb + by) * wb + bx]) units.push_back((n * hb + by) * wb + bx);
      return;
    }
    for (int64_t ty = ty_begin; ty < ty_end; ++ty) {
      for (int64_t tx = 0; tx < tx_count; ++tx) {
        bool on = false;
        for (int64_t by = ty * blocks_per_tile; by < std::min(hb, (ty + 1) * blocks_per_tile) && !on; ++by)
          for (int64_t bx = tx * blocks_per_tile; bx < std::min(wb, (tx + 1) * blocks_per_tile); ++bx)
            if (gd[(n * hb + by) * wb + bx]) { on = true; break; }
        if (on) units.push_back((n * ty_count + ty) * tx_count + tx);
      }
    }
  };
  const double busy_above = crossover * g.n * (pixel_path ? hb * wb : ty_count * tx_count);
  auto busy_frame = [&]() -> std::vector<int64_t> {
    // the caller takes the whole frame (reference and output), as a dense frame does; nothing here is
    // worth doing first (the owned-input update, footprint and masked write-back of a full recompute cost
    // 2-4x the plain convolution on yolox-nano's layers). Every output is computed: every block counts as
    // gated (the scan may have stopped early).
    std::memset(gd, 1, gate.numel());
    std::memset(md, 2, mark.numel());
    return {static_cast<int64_t>(units.size()), g.n * g.ho * g.wo, 2, 0};
  };
  if (incremental || forced) {
    const int64_t gate_grain = grain_rows(g.wo * g.kh * g.kw * block);
    if (forced) {
      at::parallel_for(0, g.n * g.h, grain_rows(g.w * C), residual_rows);
      at::parallel_for(0, g.n * hb, gate_grain, gate_rows);
    } else {
      const int64_t residual_grain = grain_for(g.n * g.h, grain_rows(g.w * C), marked * C);
      if (im) at::parallel_for(0, g.n * g.h, residual_grain, residual_rows);
      int64_t evaluated = 0;  // blocks gated again: those reading a written pixel, those that fired last
      for (int64_t b = 0; b < g.n * hb * wb; ++b) evaluated += gd[b] || dirty[b];
      const int64_t gate_work = evaluated * block * block * g.kh * g.kw;
      at::parallel_for(0, g.n * hb, grain_for(g.n * hb, gate_grain, gate_work), gate_rows);
    }
    for (int64_t n = 0; n < g.n && !forced; ++n) collect_units(n, 0, ty_count);
  } else {
    // A full scan runs in bands of tile rows and stops as soon as more units are active than the
    // crossover: a busy frame (moving camera, the probe of a layer in back-off) is decided after the part
    // of the map that holds that many units, not the whole map. The units, gates and residuals of a frame
    // that is not busy are those of one pass over the whole map.
    const int64_t bands =
        std::clamp<int64_t>(g.h * g.w * C / (kGrainsPerBand * kGrainElements), 1, std::min(kScanBands, ty_count));
    const int64_t band = (ty_count + bands - 1) / bands;
    for (int64_t n = 0; n < g.n; ++n) {
      int64_t rows_done = 0;
      for (int64_t ty0 = 0; ty0 < ty_count; ty0 += band) {
        const int64_t ty1 = std::min(ty_count, ty0 + band);
        const bool last = ty1 == ty_count;
        const int64_t by0 = std::min(hb, ty0 * blocks_per_tile);
        const int64_t by1 = last ? hb : std::min(hb, ty1 * blocks_per_tile);
        // the input rows the band's outputs read (all that are left, for the last band)
        const int64_t oy_end = std::min(g.ho, by1 * block);
        const int64_t y_end =
            last ? g.h : std::clamp<int64_t>((oy_end - 1) * g.sh - g.ph + g.dh * (g.kh - 1) + 1, 0, g.h);
        if (y_end > rows_done)
          at::parallel_for(n * g.h + rows_done, n * g.h + y_end, grain_rows(g.w * C), residual_rows);
        rows_done = std::max(rows_done, y_end);
        at::parallel_for(n * hb + by0, n * hb + by1, grain_rows(g.wo * g.kh * g.kw * block), gate_rows);
        collect_units(n, ty0, ty1);
        if (static_cast<double>(units.size()) > busy_above) return busy_frame();
      }
    }
  }
  // per input row: whether it may hold an owned input (the footprint pass skips outputs reading none)
  std::vector<uint8_t> owned_rows(g.n * g.h, 0);
  if (forced) {
    const int64_t* f = forced_tiles->data_ptr<int64_t>();
    units.assign(f, f + forced_tiles->numel());
    if (units.empty()) return {0, 0, 3, 0};  // the scan alone: what an idle frame costs
    if (pixel_path) {
      // the inputs the forced blocks own, as if changed: the step then writes what a frame with those
      // blocks gated writes (their footprint), not just the blocks' own outputs
      std::vector<uint8_t> on(g.n * hb * wb, 0);
      for (const int64_t b : units) on[b] = 1;
      for (int64_t row = 0; row < g.n * g.h; ++row) {
        const uint8_t* brow = on.data() + (row / g.h * hb + rown[row % g.h] / block) * wb;
        for (int64_t xx = 0; xx < g.w; ++xx) {
          od[row * g.w + xx] = brow[cown[xx] / block] ? 2 : 0;
          owned_rows[row] |= od[row * g.w + xx];
        }
      }
    } else {
      std::fill(owned_rows.begin(), owned_rows.end(), 1);  // the last frame's owned map: any row
    }
  } else {
    if (units.empty()) {
      std::memset(md, 0, mark.numel());
      return {0, 0, 0, 0};
    }
    if (static_cast<double>(units.size()) > busy_above) return busy_frame();
    // 4. the inputs owned by a gated output take their new value (rows under no gated block: none)
    std::vector<uint8_t> gated_rows(g.n * hb);
    for (int64_t b = 0; b < g.n * hb; ++b) gated_rows[b] = std::memchr(gd + b * wb, 1, wb) != nullptr;
    int64_t rows_on = 0;
    for (int64_t row = 0; row < g.n * g.h; ++row)
      rows_on += gated_rows[row / g.h * hb + rown[row % g.h] / block];
    const int64_t owned_grain = grain_for(g.n * g.h, grain_rows(g.w * C), rows_on * g.w * C);
    at::parallel_for(0, g.n * g.h, owned_grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.h, y = row % g.h;
        uint8_t* orow = od + row * g.w;
        owned_rows[row] = gated_rows[n * hb + rown[y] / block];
        if (!owned_rows[row]) {
          std::memset(orow, 0, g.w);
          continue;
        }
        const uint8_t* grow = gd + (n * hb + rown[y] / block) * wb;
        const float* rr = rd + row * g.w;
        for (int64_t xx = 0; xx < g.w; ++xx) {
          if (!grow[cown[xx] / block]) {
            orow[xx] = 0;
          } else if (rr[xx] > 0.f) {
            std::memcpy(pad_pixel(n, y + g.ph, xx + g.pw), xd + (row * g.w + xx) * C, C * sizeof(float));
            rd[row * g.w + xx] = 0.f;  // x_ref = x here now (the incremental step reads r_abs next time)
            orow[xx] = 2;
          } else {
            orow[xx] = 1;  // unchanged: nothing to copy, but its readers count as computed
          }
        }
      }
    });
  }
  // 5. which outputs are recomputed (footprint of the owned inputs) and which are written
  // (forced tiles: from the last frame's owned map, the cost is what is timed, the result is unused)
  std::vector<uint8_t> footprint_rows(g.n * g.ho, 0);  // output rows with a tap row holding an owned input
  int64_t footprint_count = 0;
  for (int64_t row = 0; row < g.n * g.ho; ++row) {
    const int64_t n = row / g.ho, y0 = row % g.ho * g.sh - g.ph;
    for (int64_t ky = 0; ky < g.kh && !footprint_rows[row]; ++ky) {
      const int64_t y = y0 + ky * g.dh;
      footprint_rows[row] = y >= 0 && y < g.h && owned_rows[n * g.h + y];
    }
    footprint_count += footprint_rows[row];
  }
  const int64_t footprint_work = footprint_count * g.wo * g.kh * g.kw;
  const int64_t computed = at::parallel_reduce(
        0, g.n * g.ho, grain_for(g.n * g.ho, grain_rows(g.wo * g.kh * g.kw), footprint_work), int64_t(0),
        [&](int64_t begin, int64_t end, int64_t partial) {
          // the largest owned-map value under each output's taps, separated: first per input column over
          // the kernel's tap rows (a pass a vector unit does whole), then over each output's taps along
          // the row (folding all taps per output, with their bounds checks, cost 13 us a step on
          // HRNet-w32's 64x64 maps)
          std::vector<uint8_t> column(g.w);
          for (int64_t row = begin; row < end; ++row) {
            const int64_t n = row / g.ho, oy = row % g.ho;
            const uint8_t* map = od + n * g.h * g.w;
            uint8_t* mrow = md + row * g.wo;
            if (!footprint_rows[row]) {
              std::memset(mrow, 0, g.wo);
              continue;
            }
            std::fill(column.begin(), column.end(), uint8_t(0));
            for (int64_t ky = 0; ky < g.kh; ++ky) {
              const int64_t y = oy * g.sh - g.ph + ky * g.dh;
              if (y < 0 || y >= g.h) continue;
              const uint8_t* src = map + y * g.w;
              uint8_t* dst = column.data();
#pragma omp simd
              for (int64_t x = 0; x < g.w; ++x) dst[x] = std::max(dst[x], src[x]);
            }
            for (int64_t ox = 0; ox < g.wo; ++ox) {
              const int64_t x0 = ox * g.sw - g.pw;
              uint8_t value = 0;
              if (x0 >= 0 && x0 + (g.kw - 1) * g.dw < g.w) {
                for (int64_t kx = 0; kx < g.kw; ++kx) value = std::max(value, column[x0 + kx * g.dw]);
              } else {
                for (int64_t kx = 0; kx < g.kw; ++kx) {
                  const int64_t x = x0 + kx * g.dw;
                  if (x >= 0 && x < g.w) value = std::max(value, column[x]);
                }
              }
              mrow[ox] = value;
              partial += value > 0;
            }
          }
          return partial;
        },
        std::plus<int64_t>());
  const int64_t count = static_cast<int64_t>(units.size());
  const float lo = static_cast<float>(act_lo), hi = static_cast<float>(act_hi);
  // 6'. pixels: the outputs to write, their receptive fields gathered as rows (tap by tap, C contiguous
  // floats each), one matrix product, write-back
  auto recompute_pixels = [&](const at::Tensor& matrix) -> int64_t {
    std::vector<int64_t> pixels;  // flat (n, oy, ox); only footprint rows hold any
    std::vector<const float*> fields;  // each one's receptive field: its first tap in x_pad
    for (int64_t row = 0; row < g.n * g.ho; ++row) {
      if (!footprint_rows[row]) continue;
      const uint8_t* mrow = md + row * g.wo;
      const float* first = pad_pixel(row / g.ho, row % g.ho * g.sh, 0);
      for (int64_t ox = 0; ox < g.wo; ++ox) {
        if (mrow[ox] != 2) continue;
        pixels.push_back(row * g.wo + ox);
        fields.push_back(first + ox * g.sw * C);
      }
    }
    const int64_t m = static_cast<int64_t>(pixels.size());
    if (m == 0) return 0;
    const int64_t taps = g.kh * g.kw, row_len = taps * C;
    std::vector<int64_t> tap_offsets(taps);  // each tap's pixel from the receptive field's first, in floats
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx) tap_offsets[ky * g.kw + kx] = (ky * g.dh * g.wp + kx * g.dw) * C;
    if (groups != 1) {  // depthwise: matrix [taps, C], one output channel per input channel
      const float* wd = matrix.data_ptr<float>();
      const float* bd = bias.has_value() ? bias->data_ptr<float>() : nullptr;

      at::parallel_for(0, m, grain_rows(row_len), [&](int64_t begin, int64_t end) {
        std::vector<float> acc(C);
        std::vector<const float*> tap_rows(taps);
        for (int64_t i = begin; i < end; ++i) {
          float* a = acc.data();
          for (int64_t t = 0; t < taps; ++t) tap_rows[t] = fields[i] + tap_offsets[t];
          if (vectors == kPanel) {
            depthwise_pixel(a, bd, wd, tap_rows.data(), taps, C);
          } else if (vectors == kPanel8) {
            depthwise_pixel_avx2(a, bd, wd, tap_rows.data(), taps, C);
          } else {
            if (bd) std::memcpy(a, bd, C * sizeof(float));
            else std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t t = 0; t < taps; ++t) {
              const float* src = tap_rows[t];
              const float* w = wd + t * C;
#pragma omp simd
              for (int64_t ch = 0; ch < C; ++ch) a[ch] += w[ch] * src[ch];
            }
          }
          write_row(zd + pixels[i] * Co, a, Co, activation, lo, hi);
        }
      });
      return m;
    }
    // a kernel row's taps are adjacent pixels, C contiguous floats each, when the kernel is not dilated
    const int64_t run = g.dw == 1 ? g.kw * C : C, runs_per_row = g.dw == 1 ? 1 : g.kw;
    const int64_t runs = g.kh * runs_per_row;
    std::vector<int64_t> run_offsets(runs);  // each run's first tap from the receptive field's first
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < runs_per_row; ++kx)
        run_offsets[ky * runs_per_row + kx] = tap_offsets[ky * g.kw + kx];
    at::Tensor out = scratch(1, m * Co);
    const float* bd = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    if (matrix.dim() == 3) {  // packed panels: the product reads the receptive fields in place
      std::vector<const float*> segments(m * runs);
      // bias and clamp are applied as the rows are stored, straight into z; SiLU's exp is left to write_row
      const bool into_z = activation != kSilu;
      float* scratch_rows = out.data_ptr<float>();
      std::vector<float*> rows(m);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < runs; ++j) segments[i * runs + j] = fields[i] + run_offsets[j];
        rows[i] = into_z ? zd + pixels[i] * Co : scratch_rows + i * Co;
      }
      const Epilogue epilogue{into_z ? bd : nullptr, into_z && activation == kClamp, lo, hi};
      TORCH_CHECK(matrix.size(2) == vectors, "skip_step: weight panels of ", matrix.size(2),
                  " channels for the ", vectors, "-float kernel");
      packed_gemm(segments.data(), runs, run, m, matrix.data_ptr<float>(), vectors, Co, rows.data(), epilogue);
      if (into_z) return m;
    } else {  // receptive fields gathered as rows, times the [Co, K] weight read transposed
      at::Tensor columns = scratch(0, m * row_len).narrow(0, 0, m * row_len).view({m, row_len});
      float* cd = columns.data_ptr<float>();
      at::parallel_for(0, m, grain_rows(row_len), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          for (int64_t j = 0; j < runs; ++j)
            std::memcpy(cd + i * row_len + j * run, fields[i] + run_offsets[j], run * sizeof(float));
      });
      at::Tensor rows = out.narrow(0, 0, m * Co).view({m, Co});
      at::mm_out(rows, columns, matrix.t());
    }
    // the bias is added on the write-back (the row is in L1 there): addmm's broadcast of it into the
    // output first cost 8-13 us a call for 50-160 rows of 128 channels, a quarter of the product
    const float* outd = out.data_ptr<float>();
    at::parallel_for(0, m, grain_rows(Co), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        write_row(zd + pixels[i] * Co, outd + i * Co, bd, Co, activation, lo, hi);
    });
    return m;
  };
  auto write = [&](const float* values, int64_t n, int64_t oy, int64_t ox) {
    if (path == 3 || md[(n * g.ho + oy) * g.wo + ox] == 2)
      write_row(zd + ((n * g.ho + oy) * g.wo + ox) * Co, values, Co, activation, lo, hi);
  };
  if (count == 0) return {0, computed, path, 0};
  if (pixel_path) return {count, computed, path, recompute_pixels(*pixel_weight)};
  // 6. gather the tiles' input patches (with halo), one batched conv, write back
  at::Tensor patches = at::empty({count, C, patch_h, patch_w},
                                 x.options().memory_format(at::MemoryFormat::ChannelsLast));
  float* pd = patches.data_ptr<float>();
  at::parallel_for(0, count * patch_h, grain_rows(patch_w * C), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / patch_h, i = item % patch_h;
      const int64_t t = units[k];
      const int64_t n = t / (ty_count * tx_count), ty = (t / tx_count) % ty_count, tx = t % tx_count;
      const float* src = pad_pixel(n, trow[ty] * g.sh + i, tcol[tx] * g.sw);
      std::memcpy(pd + (k * patch_h + i) * patch_w * C, src, patch_w * C * sizeof(float));
    }
  });
  at::Tensor out = at::conv2d(patches, weight, bias, stride, at::IntArrayRef({0, 0}), dilation, groups)
                       .contiguous(at::MemoryFormat::ChannelsLast);
  const float* outd = out.data_ptr<float>();
  // serial: tiles may overlap, and overlapping outputs must be written in one order (deterministic)
  for (int64_t k = 0; k < count; ++k) {
    const int64_t t = units[k];
    const int64_t n = t / (ty_count * tx_count), ty = (t / tx_count) % ty_count, tx = t % tx_count;
    for (int64_t i = 0; i < tile_h; ++i)
      for (int64_t j = 0; j < tile_w; ++j)
        write(outd + ((k * tile_h + i) * tile_w + j) * Co, n, trow[ty] + i, tcol[tx] + j);
  }
  return {count, computed, path, count * tile_h * tile_w};
}

// out = activation(a + b) at the pixels either input's mark map (uint8 [N, H, W], optional: no map, no
// change) gives as written (2); marks receives 2 there and 0 elsewhere. No map for either input: every
// pixel (the inputs' changes are not known); with compare (out holds the last output, intact) only the
// pixels whose value changes are written and marked 2, the rest 0, else marks are left as they are. a, b,
// out: the same shape, float32 channels_last. Returns the pixels written.
//
// (Comparing is what keeps the sparsity after an input whose changes are not known: a layer's plain frame
// recomputes the same values bit for bit where its input did not change, and without marks every sum and
// layer after such a sum would take the whole map again.)
int64_t add_marked(const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                   const c10::optional<at::Tensor>& marks_a, const c10::optional<at::Tensor>& marks_b,
                   int64_t activation, double act_lo, double act_hi, at::Tensor& marks, bool compare) {
  for (const at::Tensor* t : {&a, &b, static_cast<const at::Tensor*>(&out)})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(at::MemoryFormat::ChannelsLast) &&
                    t->sizes() == out.sizes(),
                "add_marked: float32 channels_last tensors of one shape");
  const int64_t C = out.size(1), pixels = out.size(0) * out.size(2) * out.size(3);
  const float* ad = a.data_ptr<float>();
  const float* bd = b.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const uint8_t* ma = marks_a.has_value() ? marks_a->data_ptr<uint8_t>() : nullptr;
  const uint8_t* mb = marks_b.has_value() ? marks_b->data_ptr<uint8_t>() : nullptr;
  uint8_t* md = marks.data_ptr<uint8_t>();
  const float lo = static_cast<float>(act_lo), hi = static_cast<float>(act_hi);
  if (ma || mb) {
    // rows no input wrote are cleared, not walked (most of them when few pixels changed), and a sum of a
    // few rows runs without a fork
    const int64_t rows = out.size(0) * out.size(2), W = out.size(3);
    std::vector<uint8_t> row_on(rows);
    int64_t rows_on = 0;
    for (int64_t r = 0; r < rows; ++r) {
      row_on[r] = (ma && std::memchr(ma + r * W, 2, W)) || (mb && std::memchr(mb + r * W, 2, W));
      if (!row_on[r]) std::memset(md + r * W, 0, W);
      rows_on += row_on[r];
    }
    return at::parallel_reduce(
        0, rows, grain_for(rows, grain_rows(W * C), rows_on * W * C), int64_t(0),
        [&](int64_t begin, int64_t end, int64_t partial) {
          auto written = [&](int64_t p) { return (ma && ma[p] == 2) || (mb && mb[p] == 2); };
          for (int64_t r = begin; r < end; ++r) {
            if (!row_on[r]) continue;
            // the row's written pixels asked of memory first (as the step's residuals: state at scattered
            // pixels; HRNet-w32's sums at 4.3x fewer MACs 2.2 -> 1.8 ms a frame, interleaved A/B)
            for (int64_t p = r * W; p < (r + 1) * W; ++p) {
              if (!written(p)) continue;
              prefetch_floats(ad + p * C, C);
              prefetch_floats(bd + p * C, C);
              prefetch_floats(od + p * C, C);
            }
            for (int64_t p = r * W; p < (r + 1) * W; ++p) {
              if (!written(p)) {
                md[p] = 0;
                continue;
              }
              add_row(od + p * C, ad + p * C, bd + p * C, C, activation, lo, hi);
              md[p] = 2;
              ++partial;
            }
          }
          return partial;
        },
        std::plus<int64_t>());
  }
  if (compare) {  // (every pixel from here on: no map for either input)
    return at::parallel_reduce(
        0, pixels, grain_rows(C), int64_t(0),
        [&](int64_t begin, int64_t end, int64_t partial) {
          std::vector<float> row(C);
          float* r = row.data();
          for (int64_t p = begin; p < end; ++p) {
            float* o = od + p * C;
            add_row(r, ad + p * C, bd + p * C, C, activation, lo, hi);
            const bool changed = std::memcmp(r, o, C * sizeof(float)) != 0;
            if (changed) std::memcpy(o, r, C * sizeof(float));
            md[p] = changed ? 2 : 0;
            partial += changed;
          }
          return partial;
        },
        std::plus<int64_t>());
  }
  return at::parallel_reduce(
      0, pixels, grain_rows(C), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t partial) {
        for (int64_t p = begin; p < end; ++p) {
          add_row(od + p * C, ad + p * C, bd + p * C, C, activation, lo, hi);
          ++partial;
        }
        return partial;
      },
      std::plus<int64_t>());
}

// Nearest upsampling by integer factors (fh, fw) of the input pixels its mark map (uint8 [N, H, W];
// none: every pixel) gives as written (2): each is copied into its fh x fw output pixels; marks (uint8
// [N, H * fh, W * fw]) receives 2 there and 0 elsewhere. With no map and compare (out holds the last
// output, intact), only the input pixels whose value changed are copied (as add_marked). Returns the input
// pixels copied.
int64_t upsample_marked(const at::Tensor& x, at::Tensor& out, const c10::optional<at::Tensor>& marks_in,
                        int64_t fh, int64_t fw, at::Tensor& marks, bool compare) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast) && out.size(0) == x.size(0) &&
                  out.size(1) == x.size(1) && out.size(2) == x.size(2) * fh && out.size(3) == x.size(3) * fw,
              "upsample_marked: float32 channels_last maps, out = x upsampled by (fh, fw)");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), Wo = W * fw;
  const float* xd = x.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const uint8_t* mi = marks_in.has_value() ? marks_in->data_ptr<uint8_t>() : nullptr;
  uint8_t* mo = marks.data_ptr<uint8_t>();
  return at::parallel_reduce(
      0, x.size(0) * H, grain_rows(W * C * fh * fw), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t partial) {
        for (int64_t row = begin; row < end; ++row) {  // (n, y): output rows (n, y * fh + dy)
          for (int64_t xx = 0; xx < W; ++xx) {
            const float* src = xd + (row * W + xx) * C;
            const bool take = mi ? mi[row * W + xx] == 2
                                 : !compare || std::memcmp(src, od + (row * fh * Wo + xx * fw) * C,
                                                           C * sizeof(float)) != 0;
            partial += take;
            for (int64_t dy = 0; dy < fh; ++dy) {
              const int64_t out_row = row * fh + dy;
              uint8_t* mrow = mo + out_row * Wo + xx * fw;
              std::memset(mrow, take ? 2 : 0, fw);
              if (!take) continue;
              for (int64_t dx = 0; dx < fw; ++dx)
                std::memcpy(od + (out_row * Wo + xx * fw + dx) * C, src, C * sizeof(float));
            }
          }
        }
        return partial;
      },
      std::plus<int64_t>());
}

// What concat_marked knows of an input since its last call.
enum InputChange : int64_t { kUnchanged = 0, kMarked = 1, kUnknown = 2, kWhole = 3 };

// out = the inputs ([N, C_i, H, W] float32 channels_last maps) concatenated along the channels,
// each input following what is known of its change (changes[i], an InputChange): unchanged, nothing to
// do; marked, its pixels whose mark map (uint8 [N, H, W]) holds 2 are copied; unknown, every pixel is
// compared with its slice of out (which holds the last output, intact) and copied where it differs; whole,
// every pixel is copied (out laid out afresh). marks receives 2 where a slice was written, 0 elsewhere.
// Returns the pixels written.
int64_t concat_marked(const std::vector<at::Tensor>& inputs,
                      const std::vector<c10::optional<at::Tensor>>& input_marks,
                      const std::vector<int64_t>& changes, at::Tensor& out, at::Tensor& marks) {
  const int64_t count = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(count > 0 && static_cast<int64_t>(input_marks.size()) == count &&
                  static_cast<int64_t>(changes.size()) == count,
              "concat_marked: one mark map and one change per input");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 4 &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast) && marks.scalar_type() == at::kByte &&
                  marks.numel() == out.size(0) * out.size(2) * out.size(3),
              "concat_marked: out float32 channels_last, marks uint8 [N, H, W]");
  const int64_t Co = out.size(1), pixels = out.size(0) * out.size(2) * out.size(3);
  std::vector<const float*> src(count);
  std::vector<const uint8_t*> mk(count, nullptr);
  std::vector<int64_t> channels(count), offset(count);
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 4 &&
                    t.is_contiguous(at::MemoryFormat::ChannelsLast) && t.size(0) == out.size(0) &&
                    t.size(2) == out.size(2) && t.size(3) == out.size(3),
                "concat_marked: inputs float32 channels_last of out's batch and size");
    TORCH_CHECK(changes[i] != kMarked || (input_marks[i].has_value() && input_marks[i]->numel() == pixels),
                "concat_marked: a marked input needs its mark map");
    src[i] = t.data_ptr<float>();
    if (changes[i] == kMarked) mk[i] = input_marks[i]->data_ptr<uint8_t>();
    channels[i] = t.size(1);
    offset[i] = total;
    total += channels[i];
  }
  TORCH_CHECK(total == Co, "concat_marked: the inputs' channels must add up to out's");
  float* od = out.data_ptr<float>();
  uint8_t* md = marks.data_ptr<uint8_t>();
  return at::parallel_reduce(
      0, pixels, grain_rows(Co), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t partial) {
        for (int64_t p = begin; p < end; ++p) {
          bool wrote = false;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t change = changes[i];
            if (change == kUnchanged || (change == kMarked && mk[i][p] != 2)) continue;
            const float* from = src[i] + p * channels[i];
            float* to = od + p * Co + offset[i];
            const size_t bytes = channels[i] * sizeof(float);
            if (change == kUnknown && std::memcmp(to, from, bytes) == 0) continue;
            std::memcpy(to, from, bytes);
            wrote = true;
          }
          md[p] = wrote ? 2 : 0;
          partial += wrote;
        }
        return partial;
      },
      std::plus<int64_t>());
}

// out = x ([N, C, H, W] float32 channels_last) zero-padded, x at (top, left) of out, following what is
// known of x's change (an InputChange, as concat_marked): marked, its pixels whose mark map (uint8 [N, H,
// W]) holds 2 are copied; unknown, every pixel is compared with out's and copied where it differs; whole,
// out is written whole, borders included. marks (uint8 [N, Ho, Wo]) receives 2 where a pixel was written,
// 0 elsewhere (the borders: never written after the first time). Returns the pixels written.
int64_t pad_marked(const at::Tensor& x, at::Tensor& out, const c10::optional<at::Tensor>& input_marks,
                   int64_t top, int64_t left, int64_t change, at::Tensor& marks) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && x.dim() == 4 &&
                  out.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast) && out.size(0) == x.size(0) &&
                  out.size(1) == x.size(1) && top >= 0 && left >= 0 && out.size(2) >= x.size(2) + top &&
                  out.size(3) >= x.size(3) + left,
              "pad_marked: float32 channels_last maps, x inside out at (top, left)");
  TORCH_CHECK(marks.scalar_type() == at::kByte && marks.numel() == out.size(0) * out.size(2) * out.size(3),
              "pad_marked: marks uint8 [N, Ho, Wo]");
  TORCH_CHECK(change != kMarked || (input_marks.has_value() &&
                                    input_marks->numel() == x.size(0) * x.size(2) * x.size(3)),
              "pad_marked: a marked input needs its mark map");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), Ho = out.size(2), Wo = out.size(3);
  const float* xd = x.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const uint8_t* mi = change == kMarked ? input_marks->data_ptr<uint8_t>() : nullptr;
  uint8_t* md = marks.data_ptr<uint8_t>();
  std::memset(md, 0, marks.numel());
  if (change == kWhole) out.zero_();
  if (change == kUnchanged) return 0;
  const size_t bytes = C * sizeof(float);
  return at::parallel_reduce(
      0, x.size(0) * H, grain_rows(W * C), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t partial) {
        for (int64_t row = begin; row < end; ++row) {  // (n, y)
          const int64_t n = row / H, y = row % H;
          const uint8_t* mrow = mi ? mi + row * W : nullptr;
          if (mrow && !std::memchr(mrow, 2, W)) continue;
          const int64_t out_row = (n * Ho + y + top) * Wo + left;
          for (int64_t xx = 0; xx < W; ++xx) {
            if (mrow && mrow[xx] != 2) continue;
            const float* from = xd + (row * W + xx) * C;
            float* to = od + (out_row + xx) * C;
            if (change == kUnknown && std::memcmp(to, from, bytes) == 0) continue;
            std::memcpy(to, from, bytes);
            md[out_row + xx] = 2;
            ++partial;
          }
        }
        return partial;
      },
      std::plus<int64_t>());
}

// The mean |value| of each sample of a float map whose samples are each one contiguous block (NCHW or
// channels_last; N entries out): a layer's output scale, taken on every stream's first frame. torch's
// abs().mean() writes a map-sized |z| first: 3-4x the time of this one read (page faults included).
// Partial sums: float lanes over chunks, a double per chunk.
at::Tensor mean_abs(const at::Tensor& map) {
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.dim() >= 1 && map.size(0) > 0 &&
                  (map.is_contiguous() || map.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "mean_abs: a dense float32 map");
  const int64_t samples = map.size(0), per_sample = map.numel() / samples;
  const float* data = map.data_ptr<float>();
  constexpr int64_t kChunk = 4096, kLanes = 16;
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  at::Tensor out = at::empty({samples}, map.options());
  float* od = out.data_ptr<float>();
  for (int64_t n = 0; n < samples; ++n) {
    const float* sample = data + n * per_sample;
    const double total = at::parallel_reduce(
        0, chunks, grain_for(chunks, std::max<int64_t>(1, kGrainElements / kChunk), per_sample), 0.0,
        [&](int64_t begin, int64_t end, double partial) {
          for (int64_t chunk = begin; chunk < end; ++chunk) {
            const int64_t start = chunk * kChunk, stop = std::min(per_sample, start + kChunk);
            float lanes[kLanes] = {};
            int64_t i = start;
            for (; i + kLanes <= stop; i += kLanes)
              for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] += std::fabs(sample[i + lane]);
            for (; i < stop; ++i) lanes[0] += std::fabs(sample[i]);
            float sum = 0.f;
            for (int64_t lane = 0; lane < kLanes; ++lane) sum += lanes[lane];
            partial += sum;
          }
          return partial;
        },
        std::plus<double>());
    od[n] = static_cast<float>(total / static_cast<double>(per_sample));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skip_step", &skip_step, "One Skip-Conv frame of one layer (CPU, channels_last float32)");
  m.def("add_marked", &add_marked, "A sum (and its activation) recomputed where its inputs were written");
  m.def("upsample_marked", &upsample_marked, "Nearest upsampling of the pixels its input wrote");
  m.def("concat_marked", &concat_marked, "A channel concatenation rewritten where its inputs changed");
  m.def("pad_marked", &pad_marked, "A zero padding rewritten where its input changed");
  m.def("mean_abs", &mean_abs, "The mean |value| of each sample of a dense float map");
  m.def("vector_width", &vector_width, "Floats per register of the widest pixel-path kernels this CPU runs");
}
