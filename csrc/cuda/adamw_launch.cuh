// Host-side driver of the projected AdamW CUDA kernels (adamw_kernels.cuh), torch-free: launch
// tables, the order of launches, the second-stage tables. The extension (adamw_cuda.cu) passes a
// launcher that runs `launch(kernel, blocks, threads, args...)` with <<<>>> on the current stream;
// tests/adamw_emu.cpp passes one that runs the same kernels in a CPU emulation. Buffers are the
// caller's (sizes: adam_rows, adam_bucket).
//
//   adam_run_small   single pass, one block per tensor of at most kAdamSingleMax elements
//   adam_run_large   pass 1, the k x k step on the device, pass 2 (projected_adamw_)
//   adam_run_pass1   pass 1 and its reduction into [T, k_max + 1] (projected_adamw_pass1_)
//   adam_run_pass2   pass 2 with given weights and its reduction into [T] (projected_adamw_pass2_)
#pragma once

#include "adamw_kernels.cuh"

#include <type_traits>

namespace ogpsa {
namespace cuda {

struct AdamTensor {
  void* p;
  const void* g;
  float* m;
  float* v;
  float* vmax;
  const void* u;
  const float* minv;
  int64_t n;
  float bc1, bc2s;
  int32_t k;
  int32_t tid;  // single pass: the caller's index (stats row); two passes: the weights row
};

inline int64_t adam_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

// rank bucket K in {2, 4, 8, 16}: the smallest >= every k (register arrays are sized by it)
inline int adam_bucket(const AdamTensor* ts, size_t count) {
  int k = 0;
  for (size_t i = 0; i < count; ++i) k = ts[i].k > k ? ts[i].k : k;
  return k <= 2 ? 2 : k <= 4 ? 4 : k <= 8 ? 8 : 16;
}

template <typename F>
void with_bucket(int K, F&& f) {
  if (K == 2) return f(std::integral_constant<int, 2>{});
  if (K == 4) return f(std::integral_constant<int, 4>{});
  if (K == 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, 16>{});
}

// partial rows of the two-pass path (one per kAdamChunk elements of each tensor)
inline int64_t adam_rows(const AdamTensor* ts, size_t count) {
  int64_t rows = 0;
  for (size_t i = 0; i < count; ++i) rows += adam_chunks(ts[i].n, kAdamChunk);
  return rows;
}

// Calls launch(meta, blocks, first_row) for tables of up to kAdamTensors consecutive tensors of
// `ts` (tensor t gets adam_chunks(n, chunk) blocks); rows are numbered across launches in order.
template <typename F>
void for_each_adam_table(const AdamTensor* ts, size_t count, int64_t chunk, F&& launch) {
  AdamMeta meta;
  int nt = 0;
  int64_t blocks = 0, rows = 0;
  for (size_t i = 0; i < count; ++i) {
    const AdamTensor& t = ts[i];
    meta.p[nt] = t.p;
    meta.g[nt] = t.g;
    meta.m[nt] = t.m;
    meta.v[nt] = t.v;
    meta.vmax[nt] = t.vmax;
    meta.u[nt] = t.u;
    meta.minv[nt] = t.minv;
    meta.n[nt] = t.n;
    meta.bc1[nt] = t.bc1;
    meta.bc2s[nt] = t.bc2s;
    meta.k[nt] = t.k;
    meta.tid[nt] = t.tid;
    meta.block0[nt] = static_cast<int32_t>(blocks);
    blocks += adam_chunks(t.n, chunk);
    ++nt;
    // keep a launch's grid far below 2^31 blocks
    const bool full = nt == kAdamTensors || i + 1 == count ||
                      blocks + adam_chunks(ts[i + 1].n, chunk) > (int64_t{1} << 30);
    if (full) {
      meta.block0[nt] = static_cast<int32_t>(blocks);
      meta.nt = nt;
      launch(meta, blocks, rows);
      rows += blocks;
      blocks = 0;
      nt = 0;
    }
  }
}

// single pass, one block per tensor (every n <= kAdamSingleMax); stats rows ts[i].tid
template <typename P, typename U, typename Launch>
void adam_run_small(const AdamTensor* ts, size_t count, const AdamHyper& h, double* stats, Launch&& launch) {
  if (count == 0) return;
  with_bucket(adam_bucket(ts, count), [&](auto kc) {
    using Op = AdamSmallOp<P, U, decltype(kc)::value>;
    for_each_adam_table(ts, count, kAdamSingleMax, [&](const AdamMeta& meta, int64_t blocks, int64_t) {
      launch(&adam_kernel<Op>, blocks, Op::kBlock, meta, Op{h, stats});
    });
  });
}

// pass-1 launches over ts[0..count) into part [adam_rows, K + 1]
template <typename P, typename U, int K, typename Launch>
void adam_launch_pass1(const AdamTensor* ts, size_t count, const AdamHyper& h, float* part, Launch&& launch) {
  using Op = AdamPass1Op<P, U, K>;
  for_each_adam_table(ts, count, kAdamChunk, [&](const AdamMeta& meta, int64_t blocks, int64_t row0) {
    launch(&adam_kernel<Op>, blocks, Op::kBlock, meta, Op{h, part, row0});
  });
}

// second stage: tensor j's partial rows (W columns) summed by tree_reduce_kernel into out(callers[j], ...)
template <typename Out, typename Launch>
void adam_reduce_rows(const AdamTensor* ts, const int32_t* callers, size_t count, const float* part, int W, Out out,
                      Launch&& launch) {
  ReduceMeta rm;
  int nr = 0;
  int64_t first = 0;
  for (size_t j = 0; j < count; ++j) {
    rm.first[nr] = first;
    rm.count[nr] = static_cast<int32_t>(adam_chunks(ts[j].n, kAdamChunk));
    rm.tid[nr] = callers[j];
    first += rm.count[nr];
    if (++nr == kMaxReduce || j + 1 == count) {
      launch(&tree_reduce_kernel<Out>, nr, kReduceThreads, rm, part, W, out);
      nr = 0;
    }
  }
}

// pass 2 over ts[0..count) with weights rows ts[j].tid of [*, wstride]; the removed norms (partial
// rows in removed [adam_rows]) into out at callers[j]
template <typename P, typename U, typename Launch>
void adam_run_pass2(const AdamTensor* ts, const int32_t* callers, size_t count, const AdamHyper& h,
                    const float* weights, int wstride, float* removed, RemovedOut out, Launch&& launch) {
  if (count == 0) return;
  using Op = AdamPass2Op<P, U>;
  for_each_adam_table(ts, count, kAdamChunk, [&](const AdamMeta& meta, int64_t blocks, int64_t row0) {
    launch(&adam_kernel<Op>, blocks, Op::kBlock, meta, Op{h, weights, wstride, removed, row0});
  });
  adam_reduce_rows(ts, callers, count, static_cast<const float*>(removed), 1, out, launch);
}

// projected_adamw_'s two-pass path over ts[0..count) (ts[j].tid == j); callers[j]: the caller's
// index (stats row). part: [adam_rows, K + 1] with K = adam_bucket; weights: [count, kMaxRank];
// removed: [adam_rows]
template <typename P, typename U, typename Launch>
void adam_run_large(const AdamTensor* ts, const int32_t* callers, size_t count, const AdamHyper& h, double* stats,
                    float* part, float* weights, float* removed, Launch&& launch) {
  if (count == 0) return;
  with_bucket(adam_bucket(ts, count), [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    adam_launch_pass1<P, U, K>(ts, count, h, part, launch);
    AdamReduceMeta rm;
    int nr = 0;
    int64_t first = 0;
    for (size_t j = 0; j < count; ++j) {
      rm.first[nr] = first;
      rm.count[nr] = static_cast<int32_t>(adam_chunks(ts[j].n, kAdamChunk));
      rm.tid[nr] = callers[j];
      rm.local[nr] = static_cast<int32_t>(j);
      rm.k[nr] = ts[j].k;
      rm.minv[nr] = ts[j].minv;
      first += rm.count[nr];
      if (++nr == kAdamReduce || j + 1 == count) {
        launch(&adam_step_kernel<K>, nr, kReduceThreads, rm, static_cast<const float*>(part), weights, stats);
        nr = 0;
      }
    }
  });
  adam_run_pass2<P, U>(ts, callers, count, h, weights, kMaxRank, removed, RemovedOut{stats, 2, 1}, launch);
}

// projected_adamw_pass1_ over ts[0..count): [c, ||d||^2] rows into out [T, KM + 1] at callers[j]
// (out zeroed by the caller); part: [adam_rows, K + 1] with K = adam_bucket
template <typename P, typename U, typename Launch>
void adam_run_pass1(const AdamTensor* ts, const int32_t* callers, size_t count, const AdamHyper& h, double* out,
                    int KM, float* part, Launch&& launch) {
  if (count == 0) return;
  with_bucket(adam_bucket(ts, count), [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    adam_launch_pass1<P, U, K>(ts, count, h, part, launch);
    adam_reduce_rows(ts, callers, count, static_cast<const float*>(part), K + 1, DotsOut{out, KM, K}, launch);
  });
}

}  // namespace cuda
}  // namespace ogpsa
