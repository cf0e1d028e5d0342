// roberta_fast._C_emu.emu: the emulation runtime's controls and the self-test kernels that
// tests/test_cuda_emulation.py runs to pin the emulated primitives against the PTX ISA's layouts.
// The probes are ordinary kernels launched through RF_LAUNCH, calling the same wrappers as the real
// kernels (csrc/primitives.cuh) and the same CUDA built-ins. Emulated build only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "../common.cuh"
#include "../philox.cuh"
#include "../primitives.cuh"
#include "runtime.h"

namespace py = pybind11;

namespace rf_emu {
namespace {

template <typename T>
T* as(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// ----------------------------------------------------------------------------- primitive probes
struct MmaProbe {
  const uint32_t* a;  // (32, 4) A fragments, lane-major
  const uint32_t* b;  // (32, 2) B fragments
  const float* c;     // (32, 4) C fragments
  float* d;           // (32, 4) D fragments (out)
};

template <typename T>
__global__ void mma_probe_kernel(const MmaProbe p) {
  const int lane = threadIdx.x;
  uint32_t a[4];
  float d[4];
  for (int i = 0; i < 4; ++i) {
    a[i] = p.a[4 * lane + i];
    d[i] = p.c[4 * lane + i];
  }
  rf::mma_16816<T>(d, a, p.b[2 * lane], p.b[2 * lane + 1]);
  for (int i = 0; i < 4; ++i) p.d[4 * lane + i] = d[i];
}

struct LdmatrixProbe {
  const unsigned char* src;  // copied into dynamic shared memory first
  int nbytes;
  const int* offsets;  // (32,) byte offset of each lane's row address
  uint32_t* out;       // (32, 4)
};

template <bool TRANS>
__global__ void ldmatrix_probe_kernel(const LdmatrixProbe p) {
  RF_EXTERN_SHARED(unsigned char, smem);
  for (int i = threadIdx.x; i < p.nbytes; i += blockDim.x) smem[i] = p.src[i];
  __syncthreads();
  uint32_t r[4];
  if (TRANS) {
    rf::ldmatrix_x4_trans(r, smem + p.offsets[threadIdx.x]);
  } else {
    rf::ldmatrix_x4(r, smem + p.offsets[threadIdx.x]);
  }
  for (int i = 0; i < 4; ++i) p.out[4 * threadIdx.x + i] = r[i];
}

struct CpAsyncProbe {
  const unsigned char* src;  // (32, 16) bytes
  const int* src_size;       // (32,) bytes each lane copies (the rest of its 16 is zero-filled)
  int use_wrapper;           // 1: rf::cp_async_16(dst, src, src_size == 16); 0: the runtime's cp.async
  uint32_t* before;          // (32,) first word of the next lane's slot, read before anyone waited
  unsigned char* after;      // (32, 16) each lane's slot after its wait
};

__global__ void cp_async_probe_kernel(const CpAsyncProbe p) {
  RF_EXTERN_SHARED(unsigned char, smem);  // (32, 16)
  const int lane = threadIdx.x;
  if (p.use_wrapper) {
    rf::cp_async_16(smem + 16 * lane, p.src + 16 * lane, p.src_size[lane] == 16);
  } else {
    cp_async(smem + 16 * lane, p.src + 16 * lane, 16, p.src_size[lane]);
  }
  rf::cp_async_commit();
  __syncwarp();
  uint32_t w;
  std::memcpy(&w, smem + 16 * ((lane + 1) % 32), 4);
  p.before[lane] = w;
  __syncwarp();  // every lane has looked before anyone waits
  rf::cp_async_wait_all();
  for (int i = 0; i < 16; ++i) p.after[16 * lane + i] = smem[16 * lane + i];
}

struct ShflProbe {
  const uint32_t* v;  // (32,) values
  const int* b;       // (32,) source lane / delta / lane mask
  int mode, width;
  unsigned mask;
  uint32_t* out;  // (32,); lanes outside the mask write 0xdeadbeef and exit at once
};

__global__ void shfl_probe_kernel(const ShflProbe p) {
  const int lane = threadIdx.x;
  if (!(p.mask >> lane & 1u)) {
    p.out[lane] = 0xdeadbeefu;
    return;
  }
  uint32_t r = 0;
  switch (p.mode) {
    case 0: r = __shfl_sync(p.mask, p.v[lane], p.b[lane], p.width); break;
    case 1: r = __shfl_up_sync(p.mask, p.v[lane], static_cast<unsigned>(p.b[lane]), p.width); break;
    case 2: r = __shfl_down_sync(p.mask, p.v[lane], static_cast<unsigned>(p.b[lane]), p.width); break;
    default: r = __shfl_xor_sync(p.mask, p.v[lane], p.b[lane], p.width); break;
  }
  p.out[lane] = r;
}

struct PhiloxProbe {
  const uint32_t* ctr;  // (n, 4) counters
  const uint32_t* key;  // (n, 2) keys
  uint32_t* out;        // (n, 4)
  int64_t n;
};

// csrc/philox.cuh's philox4x32_10, the generator of the dropout kernels, one call per thread and row
__global__ void philox_probe_kernel(const PhiloxProbe p) {
  for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) {
    const uint32_t* c = p.ctr + 4 * i;
    const rf::Philox4 r = rf::philox4x32_10(rf::Philox4{c[0], c[1], c[2], c[3]}, p.key[2 * i], p.key[2 * i + 1]);
    p.out[4 * i] = r.x, p.out[4 * i + 1] = r.y, p.out[4 * i + 2] = r.z, p.out[4 * i + 3] = r.w;
  }
}

struct VoteProbe {
  const int* pred;  // (32,)
  unsigned mask;
  uint32_t* out;  // (32, 3): ballot, any, all
};

__global__ void vote_probe_kernel(const VoteProbe p) {
  const int lane = threadIdx.x;
  if (!(p.mask >> lane & 1u)) return;
  p.out[3 * lane] = __ballot_sync(p.mask, p.pred[lane]);
  p.out[3 * lane + 1] = static_cast<uint32_t>(__any_sync(p.mask, p.pred[lane]));
  p.out[3 * lane + 2] = static_cast<uint32_t>(__all_sync(p.mask, p.pred[lane]));
}

// ----------------------------------------------------------------------------- scheduling probes
struct BlockProbe {
  int variant;
  int live;    // threads with threadIdx.x >= live return at once
  float* out;  // (gridDim.x, blockDim.x)
};

// variant 0: each thread writes its slot, __syncthreads, reads another warp's slot (correct)
// variant 1: the same without the barrier (a race: the result depends on the schedule)
// variant 2: threads past `live` exit before two barriers (exited threads do not hold a barrier)
// variant 3: reads a static shared slot nobody wrote in this block (block 0 writes it first)
// variant 4: lane 0 waits at __syncthreads while lanes 1-31 wait at a shuffle (deadlock)
// variant 5: lanes 0-15 shuffle, lanes 16-31 vote, same mask (divergent collectives)
// variant 6: a shuffle whose member mask leaves out the calling lane
__global__ void block_probe_kernel(const BlockProbe p) {
  __shared__ float slots[256];
  __shared__ float spare[4];
  const int t = threadIdx.x, n = blockDim.x;
  float* out = p.out + static_cast<int64_t>(blockIdx.x) * n;
  switch (p.variant) {
    case 0:
    case 1:
      slots[t] = static_cast<float>(t);
      if (p.variant == 0) __syncthreads();
      out[t] = slots[(t + 32) % n];
      break;
    case 2:
      if (t >= p.live) return;
      slots[t] = static_cast<float>(t);
      __syncthreads();
      out[t] = slots[(t + 1) % p.live];
      __syncthreads();
      break;
    case 3:
      if (blockIdx.x == 0 && t == 0) spare[0] = 1.f;
      __syncthreads();
      out[t] = spare[0];
      break;
    case 4:
      if (t == 0) {
        __syncthreads();
      } else if (t < 32) {
        out[t] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      } else {
        __syncthreads();
      }
      break;
    case 5:
      if (t % 32 < 16) {
        out[t] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      } else {
        out[t] = static_cast<float>(__ballot_sync(0xffffffffu, 1));
      }
      break;
    default:
      out[t] = __shfl_xor_sync(0xfffffffeu, 1.f, 1);
      break;
  }
}

struct BigStaticProbe {
  float* out;
};

// 40 KB of static shared memory: with more than 8 KB of dynamic shared memory it exceeds 48 KB
__global__ void big_static_probe_kernel(const BigStaticProbe p) {
  __shared__ float big[10240];
  __shared__ double small[3];
  RF_EXTERN_SHARED(float, dyn);
  big[threadIdx.x] = 1.f;
  small[0] = 2.0;
  dyn[0] = 0.f;
  __syncthreads();
  if (threadIdx.x == 0) p.out[0] = big[0] + static_cast<float>(small[0]) + dyn[0];
}

struct PastEndProbe {
  int n;
  float* out;
};

// reads byte n of an n-byte dynamic shared arena: one past its end (the AddressSanitizer build's canary)
__global__ void past_end_probe_kernel(const PastEndProbe p) {
  RF_EXTERN_SHARED(unsigned char, smem);
  p.out[0] = static_cast<float>(smem[p.n]);
}

void run_or_raise(const char* name) { rf::check_launch(name); }

}  // namespace

void bind(py::module_& m) {
  m.attr("SCHEDULES") = py::cast(schedules());
  m.def(
      "set_schedule", [](const std::string& name, uint64_t seed) { set_schedule(name, seed); },
      "how the CUDA threads of a block take turns (one of SCHEDULES); random uses `seed`", py::arg("name"),
      py::arg("seed") = 0);
  m.def("schedule", [] { return py::make_tuple(schedule_name(), schedule_seed()); }, "(name, seed) in use");
  m.def(
      "stats",
      [] {
        const Stats s = stats();
        py::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["threads"] = s.threads;
        d["switches"] = s.switches;
        d["barriers"] = s.barriers;
        d["collectives"] = s.collectives;
        return d;
      },
      "counters since the last reset_stats()");
  m.def("reset_stats", &reset_stats);
  m.attr("MAX_SHARED_PER_BLOCK_OPTIN") = kMaxSharedPerBlockOptin;

  // ---- conversions (host functions of emu/half.h, the ones the kernels call)
  m.def(
      "convert",
      [](int kind, uintptr_t src, uintptr_t dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) {
          switch (kind) {
            case 0: as<__half>(dst)[i] = __float2half_rn(as<const float>(src)[i]); break;
            case 1: as<__nv_bfloat16>(dst)[i] = __float2bfloat16_rn(as<const float>(src)[i]); break;
            case 2: as<float>(dst)[i] = __half2float(as<const __half>(src)[i]); break;
            case 3: as<float>(dst)[i] = __bfloat162float(as<const __nv_bfloat16>(src)[i]); break;
            case 4: as<__half2>(dst)[i] = __floats2half2_rn(as<const float>(src)[2 * i], as<const float>(src)[2 * i + 1]); break;
            case 5:
              as<__nv_bfloat162>(dst)[i] =
                  __floats2bfloat162_rn(as<const float>(src)[2 * i], as<const float>(src)[2 * i + 1]);
              break;
            default: throw std::invalid_argument("convert: kind 0-5");
          }
        }
      },
      "0: f32 -> f16, 1: f32 -> bf16, 2: f16 -> f32, 3: bf16 -> f32, 4/5: f32 pairs -> half2/bfloat162",
      py::arg("kind"), py::arg("src"), py::arg("dst"), py::arg("n"));

  // ---- primitive probes (one warp)
  m.def(
      "mma_16816",
      [](int dtype, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d) {
        const MmaProbe p{as<const uint32_t>(a), as<const uint32_t>(b), as<const float>(c), as<float>(d)};
        if (dtype == rf::kF16) {
          RF_LAUNCH(1, 32, 0, nullptr, mma_probe_kernel<__half>)(p);
        } else {
          RF_LAUNCH(1, 32, 0, nullptr, mma_probe_kernel<__nv_bfloat16>)(p);
        }
        run_or_raise("mma_probe_kernel");
      },
      "d = mma.sync.m16n8k16(a, b, c) on per-lane fragments a (32, 4) u32, b (32, 2) u32, c, d (32, 4) f32",
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"));
  m.def(
      "ldmatrix_x4",
      [](uintptr_t src, int nbytes, uintptr_t offsets, bool trans, uintptr_t out) {
        const LdmatrixProbe p{as<const unsigned char>(src), nbytes, as<const int>(offsets), as<uint32_t>(out)};
        const size_t smem = static_cast<size_t>(nbytes);
        if (trans) {
          RF_LAUNCH(1, 32, smem, nullptr, ldmatrix_probe_kernel<true>)(p);
        } else {
          RF_LAUNCH(1, 32, smem, nullptr, ldmatrix_probe_kernel<false>)(p);
        }
        run_or_raise("ldmatrix_probe_kernel");
      },
      "src (nbytes) copied to shared memory; lane t passes smem + offsets[t]; out (32, 4) u32", py::arg("src"),
      py::arg("nbytes"), py::arg("offsets"), py::arg("trans"), py::arg("out"));
  m.def(
      "cp_async",
      [](uintptr_t src, uintptr_t src_size, bool use_wrapper, uintptr_t before, uintptr_t after) {
        const CpAsyncProbe p{as<const unsigned char>(src), as<const int>(src_size), use_wrapper ? 1 : 0,
                             as<uint32_t>(before), as<unsigned char>(after)};
        RF_LAUNCH(1, 32, 32 * 16, nullptr, cp_async_probe_kernel)(p);
        run_or_raise("cp_async_probe_kernel");
      },
      "lane t copies src[t] (16 bytes, src_size[t] of them read) into its shared slot", py::arg("src"),
      py::arg("src_size"), py::arg("use_wrapper"), py::arg("before"), py::arg("after"));
  m.def(
      "shfl",
      [](int mode, uintptr_t v, uintptr_t b, int width, uint32_t mask, uintptr_t out) {
        const ShflProbe p{as<const uint32_t>(v), as<const int>(b), mode, width, mask, as<uint32_t>(out)};
        RF_LAUNCH(1, 32, 0, nullptr, shfl_probe_kernel)(p);
        run_or_raise("shfl_probe_kernel");
      },
      "mode 0 __shfl_sync, 1 __shfl_up_sync, 2 __shfl_down_sync, 3 __shfl_xor_sync", py::arg("mode"), py::arg("v"),
      py::arg("b"), py::arg("width"), py::arg("mask"), py::arg("out"));
  m.def(
      "vote",
      [](uintptr_t pred, uint32_t mask, uintptr_t out) {
        const VoteProbe p{as<const int>(pred), mask, as<uint32_t>(out)};
        RF_LAUNCH(1, 32, 0, nullptr, vote_probe_kernel)(p);
        run_or_raise("vote_probe_kernel");
      },
      "out (32, 3): __ballot_sync, __any_sync, __all_sync", py::arg("pred"), py::arg("mask"), py::arg("out"));

  m.def(
      "philox4x32_10",
      [](uintptr_t ctr, uintptr_t key, uintptr_t out, int64_t n) {
        RF_LAUNCH(1, 32, 0, nullptr, philox_probe_kernel)(PhiloxProbe{as<const uint32_t>(ctr), as<const uint32_t>(key),
                                                                      as<uint32_t>(out), n});
        run_or_raise("philox_probe_kernel");
      },
      "out (n, 4) u32 = Philox4x32-10 (csrc/philox.cuh) of counters ctr (n, 4) u32 under keys key (n, 2) u32",
      py::arg("ctr"), py::arg("key"), py::arg("out"), py::arg("n"));

  // ---- scheduling and launch probes
  m.def(
      "block_probe",
      [](int variant, int blocks, int threads, int live, uintptr_t out) {
        const BlockProbe p{variant, live, as<float>(out)};
        RF_LAUNCH(static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, nullptr, block_probe_kernel)(p);
        run_or_raise("block_probe_kernel");
      },
      "see block_probe_kernel in csrc/emu/module.cpp", py::arg("variant"), py::arg("blocks"), py::arg("threads"),
      py::arg("live"), py::arg("out"));
  m.def(
      "launch_probe",
      [](unsigned bx, unsigned by, unsigned bz, unsigned gy, size_t smem, int optin, uintptr_t out) {
        const BigStaticProbe p{as<float>(out)};
        if (optin >= 0) {
          const cudaError_t e =
              cudaFuncSetAttribute(big_static_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
          if (e != cudaSuccess) {
            cudaGetLastError();
            throw std::runtime_error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorName(e) + ": " +
                                     cudaGetErrorString(e));
          }
        }
        RF_LAUNCH(dim3(1, gy), dim3(bx, by, bz), smem, nullptr, big_static_probe_kernel)(p);
        run_or_raise("big_static_probe_kernel");
      },
      "big_static_probe_kernel (40 KB static shared) with this block, grid.y and dynamic shared memory; "
      "optin >= 0 sets cudaFuncAttributeMaxDynamicSharedMemorySize first",
      py::arg("bx"), py::arg("by"), py::arg("bz"), py::arg("gy"), py::arg("smem"), py::arg("optin"), py::arg("out"));
  m.def(
      "read_past_shared",
      [](int n, uintptr_t out) {
        RF_LAUNCH(1, 1, static_cast<size_t>(n), nullptr, past_end_probe_kernel)(PastEndProbe{n, as<float>(out)});
        run_or_raise("past_end_probe_kernel");
      },
      "one thread reads byte n of n bytes of dynamic shared memory, one past the end: the AddressSanitizer "
      "build reports a heap-buffer-overflow (its canary); elsewhere the read goes unnoticed",
      py::arg("n"), py::arg("out"));
  m.def(
      "static_shared",
      [](const std::string& kernel) {
        if (kernel == "big_static_probe_kernel")
          return static_shared(reinterpret_cast<const void*>(&big_static_probe_kernel));
        if (kernel == "block_probe_kernel") return static_shared(reinterpret_cast<const void*>(&block_probe_kernel));
        throw std::invalid_argument("static_shared: big_static_probe_kernel or block_probe_kernel");
      },
      "(bytes, variables) of static shared memory the runtime found for a probe kernel", py::arg("kernel"));
}

}  // namespace rf_emu
