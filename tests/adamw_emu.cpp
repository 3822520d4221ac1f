// CPU emulation of the CUDA projected AdamW kernels, for tests/test_adamw_cuda.py and
// tests/test_adamw_passes.py: the real device functors (csrc/cuda/adamw_kernels.cuh) and the real
// launch driver (adamw_launch.cuh: tables, launch order, partial rows, the k x k step), compiled
// as plain C++ and run block by block, so the CUDA path's indexing, masking, vector/scalar
// paths, reductions and barriers are checked on a machine without a GPU. Not emulated: the
// hardware itself (memory model, FMA contraction, real concurrency between blocks), the
// torch-side validation and grouping (csrc/cuda/adamw_cuda.cu).
//
// Built by the test with g++ -shared; entry point emu_adamw (the three ops' arguments as raw
// pointers; one parameter dtype and one basis dtype per call).
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// One OS thread; each CUDA thread of a block is a fiber that runs until it waits at a barrier
// (__syncthreads, or a warp's shuffle exchange). Fibers are resumed in a different pseudo-random
// order every round, so code that reads shared memory written by another thread without a barrier
// in between sees a stale value in some round. A round in which no fiber arrives at a barrier and
// none finishes is a deadlock (e.g. a __syncthreads in divergent code): abort.
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
Dim3 threadIdx, blockIdx, blockDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
// first entry through swapcontext, every later switch through _setjmp/_longjmp (no signal-mask
// system call)
struct Fiber {
  ucontext_t uc;
  jmp_buf jb;
  std::vector<char> stack;
  bool started = false, done = false;
};
ucontext_t sched_uc;
jmp_buf sched_jb;
std::vector<Fiber> fibers;
int current = 0;
long progress = 0;
uint64_t rng = 0x9E3779B97F4A7C15ull;

inline void yield() {
  if (!_setjmp(fibers[current].jb)) _longjmp(sched_jb, 1);
}

struct Barrier {
  int count = 0, arrived = 0;
  long gen = 0;
  void wait() {
    const long g = gen;
    ++progress;
    if (++arrived == count) {
      arrived = 0;
      ++gen;
      return;
    }
    while (gen == g) yield();
  }
};
Barrier block_bar;
std::vector<Barrier> warp_bar;
std::vector<float> warp_buf;
std::function<void()> body;

void trampoline() {
  body();
  fibers[current].done = true;
  ++progress;
  _longjmp(sched_jb, 1);
}

// runs body() as `threads` CUDA threads of block b
void run_block(unsigned b, int threads, std::function<void()> fn) {
  body = std::move(fn);
  fibers.assign(threads, Fiber{});
  block_bar = Barrier{threads};
  warp_bar.assign((threads + 31) / 32, Barrier{32});
  warp_buf.assign(threads, 0.f);
  blockIdx.x = b;
  blockDim.x = threads;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.stack.resize(1 << 16);
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack.data();
    f.uc.uc_stack.ss_size = f.stack.size();
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, trampoline, 0);
  }
  if (threads & (threads - 1)) {
    std::fprintf(stderr, "emulated blocks need a power-of-two thread count, got %d\n", threads);
    std::abort();
  }
  int alive = threads;
  while (alive > 0) {
    const long before = progress;
    alive = 0;
    // t = (i * stride + offset) mod threads with an odd stride: a permutation of the threads
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    const unsigned stride = static_cast<unsigned>(rng >> 33) | 1u, offset = static_cast<unsigned>(rng >> 17);
    for (int i = 0; i < threads; ++i) {
      const int t = static_cast<int>((i * stride + offset) & static_cast<unsigned>(threads - 1));
      if (fibers[t].done) continue;
      current = t;
      threadIdx.x = t;
      if (!_setjmp(sched_jb)) {
        if (fibers[t].started) {
          _longjmp(fibers[t].jb, 1);
        } else {
          fibers[t].started = true;
          swapcontext(&sched_uc, &fibers[t].uc);
        }
      }
      alive += fibers[t].done ? 0 : 1;
    }
    if (alive > 0 && progress == before) {
      std::fprintf(stderr, "emulated block %u deadlocked (a barrier not reached by every thread)\n", b);
      std::abort();
    }
  }
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar.wait(); }
inline float __shfl_down_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* buf = emu::warp_buf.data() + warp * 32;
  buf[lane] = v;
  emu::warp_bar[warp].wait();
  const float r = lane + off < 32 ? buf[lane + off] : v;
  emu::warp_bar[warp].wait();
  return r;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

#include "adamw_launch.cuh"

namespace emu {
// runs `blocks` blocks of `threads` threads one block after another
struct Launch {
  template <typename... KA, typename... A>
  void operator()(void (*kernel)(KA...), int64_t blocks, int threads, A&&... args) const {
    for (int64_t b = 0; b < blocks; ++b) run_block(static_cast<unsigned>(b), threads, [&] { kernel(args...); });
  }
};
}  // namespace emu

using namespace ogpsa::cuda;

// mode 0: projected_adamw_ (out [T, 2]); 1: pass1_ (out [T, k_max + 1]); 2: pass2_ with weights
// [T, wstride] and kappa (out [T]). hp: lr, beta1, beta2, eps, weight_decay. As the host code in
// csrc/cuda/adamw_cuda.cu for one (parameter dtype, basis dtype) group.
template <typename P, typename U>
void run(int mode, int T, void** params, void** grads, float** m, float** v, float** vmax, void** bases,
         float** minvs, const int64_t* n, const int32_t* k, const int64_t* steps, const double* hp, int maximize,
         int project_wd, const float* weights, int wstride, double kappa, int k_max, double* out) {
  const double lr = hp[0], beta1 = hp[1], beta2 = hp[2], eps = hp[3], wd = hp[4];
  AdamHyper h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.omb1 = static_cast<float>(1.0 - beta1);
  h.omb2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.lr = static_cast<float>(lr);
  h.wd = static_cast<float>(wd);
  h.shrink = project_wd ? 1.0f : 1.0f - h.lr * h.wd;
  h.kappa = mode == 2 ? static_cast<float>(kappa) : 1.0f;
  h.maximize = maximize;
  h.project_wd = project_wd;
  const int width = mode == 0 ? 2 : mode == 1 ? k_max + 1 : 1;
  for (int i = 0; i < T * width; ++i) out[i] = 0.0;
  std::vector<AdamTensor> small, large;
  std::vector<int32_t> ids;
  for (int i = 0; i < T; ++i) {
    if (n[i] == 0) continue;
    AdamTensor t{params[i], grads ? grads[i] : nullptr, m[i], v[i], vmax ? vmax[i] : nullptr,
                 k[i] ? bases[i] : nullptr, k[i] && minvs ? minvs[i] : nullptr, n[i],
                 static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(steps[i]))),
                 static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(steps[i])))), k[i], i};
    if (mode == 0 && n[i] <= kAdamSingleMax) {
      small.push_back(t);
    } else {
      if (mode == 0) t.tid = static_cast<int32_t>(large.size());
      large.push_back(t);
      ids.push_back(i);
    }
  }
  emu::Launch launch;
  const int64_t rows = adam_rows(large.data(), large.size());
  std::vector<float> part(rows * (adam_bucket(large.data(), large.size()) + 1), NAN), removed(rows, NAN);
  if (mode == 0) {
    adam_run_small<P, U>(small.data(), small.size(), h, out, launch);
    std::vector<float> w(large.size() * kMaxRank, NAN);
    adam_run_large<P, U>(large.data(), ids.data(), large.size(), h, out, part.data(), w.data(), removed.data(),
                         launch);
  } else if (mode == 1) {
    adam_run_pass1<P, U>(large.data(), ids.data(), large.size(), h, out, k_max, part.data(), launch);
  } else {
    adam_run_pass2<P, U>(large.data(), ids.data(), large.size(), h, weights, wstride, removed.data(),
                         RemovedOut{out, 1, 0}, launch);
  }
}

extern "C" int emu_adamw(int mode, int T, void** params, void** grads, float** m, float** v, float** vmax,
                         void** bases, float** minvs, const int64_t* n, const int32_t* k, const int64_t* steps, int pdt,
                         int udt, const double* hp, int maximize, int project_wd, const float* weights, int wstride,
                         double kappa, int k_max, double* out) {
  auto with_u = [&](auto ptag) {
    using P = decltype(ptag);
    if (udt == 0)
      run<P, float>(mode, T, params, grads, m, v, vmax, bases, minvs, n, k, steps, hp, maximize, project_wd, weights,
                    wstride, kappa, k_max, out);
    else
      run<P, c10::BFloat16>(mode, T, params, grads, m, v, vmax, bases, minvs, n, k, steps, hp, maximize, project_wd,
                            weights, wstride, kappa, k_max, out);
  };
  if (pdt == 0) with_u(float{});
  else if (pdt == 1) with_u(c10::BFloat16{});
  else with_u(c10::Half{});
  return 0;
}
