// The emulation runtime behind csrc/emu/cuda_emu.h: fibers, the block scheduler, barriers, warp
// collectives (shuffles, votes, __syncwarp, ldmatrix, mma.sync), cp.async, shared memory, the
// launch checks and the last-error state. Written from the PTX ISA and the CUDA programming guide;
// docs/cuda_emulation.md says what it models and what it does not.
//
// One launch at a time (a mutex): its blocks run one after the other on the calling OS thread, each
// block's CUDA threads as fibers with their own stacks. A fiber runs until it blocks; the scheduler
// (schedules()) picks the next ready fiber. Only calls into this file switch fibers.
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define RF_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RF_EMU_ASAN 1
#endif
#endif
#ifdef RF_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if !defined(__x86_64__) || defined(RF_EMU_UCONTEXT)
#define RF_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace rf_emu {

uint3 g_thread_idx{0, 0, 0};
BlockState g_block{{0, 0, 0}, dim3(), dim3()};

namespace {

// ============================================================================= contexts
// A fiber's saved state is its stack pointer; the callee-saved registers, the x87 control word and
// MXCSR sit on its stack (System V x86-64). Elsewhere: ucontext (slower: a syscall per switch).
#ifndef RF_EMU_USE_UCONTEXT
extern "C" void rf_emu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void rf_emu_ctx_start();
asm(R"(
  .text
  .p2align 4
  .globl rf_emu_ctx_switch
  .hidden rf_emu_ctx_switch
  .type rf_emu_ctx_switch,@function
rf_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rf_emu_ctx_switch, .-rf_emu_ctx_switch

  .p2align 4
  .globl rf_emu_ctx_start
  .hidden rf_emu_ctx_start
  .type rf_emu_ctx_start,@function
rf_emu_ctx_start:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size rf_emu_ctx_start, .-rf_emu_ctx_start
)");

struct Context {
  void* sp = nullptr;
};

void ctx_init(Context& c, char* stack, size_t size, void (*fn)(void*), void* arg) {
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 16);  // after the first `ret`, rsp = top - 16 (aligned)
  *--sp = reinterpret_cast<uint64_t>(&rf_emu_ctx_start);
  *--sp = 0;                               // rbp
  *--sp = 0;                               // rbx
  *--sp = reinterpret_cast<uint64_t>(fn);  // r12
  *--sp = reinterpret_cast<uint64_t>(arg); // r13
  *--sp = 0;                               // r14
  *--sp = 0;                               // r15
  sp -= 2;                                 // x87 control word at [0], MXCSR at [8]
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  std::memcpy(sp, &fcw, sizeof(fcw));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof(mxcsr));
  c.sp = sp;
}

inline void ctx_switch(Context& from, Context& to) { rf_emu_ctx_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void (*g_start_fn)(void*) = nullptr;
void ucontext_start(unsigned hi, unsigned lo) {
  void* arg = reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo);
  g_start_fn(arg);
}
void ctx_init(Context& c, char* stack, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  g_start_fn = fn;
  const auto a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&ucontext_start), 2, static_cast<unsigned>(a >> 32),
              static_cast<unsigned>(a & 0xffffffffu));
}
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ============================================================================= state
enum class St : uint8_t { kReady, kBarrier, kCollective, kExited };

struct Copy {
  char* dst;
  const char* src;
  int cp_size, src_size, group;
};

struct ThreadState {
  Context ctx;
  char* stack = nullptr;  // lowest address of the usable stack (a guard page lies below)
  size_t stack_size = 0;
  bool stack_dirty = false;  // the last fiber on this stack was abandoned (an error): clean it first
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  St st = St::kReady;
  const char* what = "";  // the barrier or collective it waits at (messages)
  std::vector<Copy> copies;  // cp.async issued and not yet landed
  int cp_group = 0;          // the open (uncommitted) cp.async group
  uint32_t in[10] = {};      // collective inputs
  const void* ptr = nullptr;
  uint32_t out[4] = {};      // collective outputs
  void* asan_fake = nullptr;
};

struct Group {  // one warp collective in progress
  unsigned mask, arrived;
  int kind;
  bool aligned;
  const char* what;
};

struct Warp {
  unsigned exists = 0, exited = 0;
  std::vector<Group> groups;
};

struct StaticVar {
  uintptr_t addr;
  size_t size;
};

struct KernelInfo {
  std::string name;  // demangled
  std::vector<StaticVar> statics;
  size_t static_bytes = 0;
  long max_dyn = -1;  // cudaFuncAttributeMaxDynamicSharedMemorySize, -1 = not set
};

enum class Schedule : int { kLockstep, kWarpAhead, kWarpAheadReverse, kRandom };
const std::vector<std::string> kScheduleNames = {"lockstep", "warp_ahead", "warp_ahead_reverse", "random"};

struct Runtime {
  std::mutex mu;
  // the launch in progress
  KernelInfo* kernel = nullptr;
  const char* launch_name = "";
  Thunk thunk = nullptr;
  void* thunk_ctx = nullptr;
  char* dyn = nullptr;
  size_t dyn_size = 0;
  // the block in progress
  std::vector<ThreadState> threads;  // grows to the largest block seen; stacks are reused
  std::vector<Warp> warps;
  int n = 0, live = 0, ready = 0, at_barrier = 0;
  bool abort = false;
  Context sched;
  ThreadState* cur = nullptr;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  uint64_t rng = 0;
  // settings, errors, counters
  std::atomic<int> schedule{-1};
  uint64_t seed = 0;
  Stats stats;
  std::unordered_map<const void*, KernelInfo> kernels;
};

// The last error, as CUDA keeps it: per host thread, returned (and cleared) by cudaGetLastError. Within
// one launch the first error wins (a deadlock after an illegal address reports the address).
struct LastError {
  cudaError_t code = cudaSuccess;
  cudaError_t message_code = cudaSuccess;
  std::string message;
  bool in_launch_recorded = false;
};
thread_local LastError t_error;

Runtime& R() {
  static Runtime* r = new Runtime();  // never destroyed: fibers may outlive static destruction order
  return *r;
}

constexpr size_t kStackSize = 256 * 1024;
[[maybe_unused]] constexpr size_t kStackTopFrames = 32 * 1024;  // ASan: the frames that never return
constexpr unsigned kFull = 0xffffffffu;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

std::string lanes_str(unsigned m) {
  std::string s = "{";
  for (int i = 0; i < 32; ++i) {
    if (!(m >> i & 1u)) continue;
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1u)) ++j;
    if (s.size() > 1) s += ",";
    s += j > i ? fmt("%d-%d", i, j) : fmt("%d", i);
    i = j;
  }
  return s + "}";
}

// ============================================================================= errors
void record_error(cudaError_t code, const std::string& msg) {
  if (t_error.in_launch_recorded) return;  // the first error of a launch wins
  t_error.in_launch_recorded = true;
  t_error.code = code;
  t_error.message_code = code;
  t_error.message = msg;
}

std::string where() {
  Runtime& r = R();
  std::string s = fmt("in %s, block (%u,%u,%u)", r.kernel ? r.kernel->name.c_str() : r.launch_name,
                      g_block.idx.x, g_block.idx.y, g_block.idx.z);
  if (r.cur != nullptr)
    s += fmt(", thread (%u,%u,%u) (warp %d lane %d)", r.cur->tid.x, r.cur->tid.y, r.cur->tid.z, r.cur->warp,
             r.cur->lane);
  return s + fmt(", schedule %s", kScheduleNames[r.schedule.load()].c_str());
}

// ============================================================================= fibers
void yield_to_scheduler(ThreadState* t, bool dying) {
  Runtime& r = R();
#ifdef RF_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &t->asan_fake, r.sched_bottom, r.sched_size);
#else
  (void)dying;
#endif
  ctx_switch(t->ctx, r.sched);
#ifdef RF_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->asan_fake, nullptr, nullptr);
#endif
}

[[noreturn]] void fiber_fail(cudaError_t code, const std::string& msg) {
  Runtime& r = R();
  record_error(code, msg + " (" + where() + ")");
  r.abort = true;
  ThreadState* t = r.cur;
  t->stack_dirty = true;
  yield_to_scheduler(t, true);
  __builtin_unreachable();
}

void land(Copy& c) {
  if (c.src_size > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_size));
  if (c.src_size < c.cp_size) std::memset(c.dst + c.src_size, 0, static_cast<size_t>(c.cp_size - c.src_size));
}

void complete(Warp& w, const Group& g);

void thread_exit(ThreadState* t) {
  Runtime& r = R();
  for (Copy& c : t->copies) land(c);  // issued copies land even if nobody waits for them
  t->copies.clear();
  t->st = St::kExited;
  --r.live;
  --r.ready;
  Warp& w = r.warps[t->warp];
  const unsigned bit = 1u << t->lane;
  w.exited |= bit;
  for (size_t i = 0; i < w.groups.size();) {
    const Group g = w.groups[i];
    if (!(g.mask & bit)) {
      ++i;
      continue;
    }
    if (g.aligned)
      fiber_fail(cudaErrorIllegalInstruction,
                 fmt("lane %d exited while lanes %s wait at %s, which needs all 32 lanes (.sync.aligned)", t->lane,
                     lanes_str(g.arrived).c_str(), g.what));
    if (((g.arrived | w.exited) & g.mask) == g.mask) {
      w.groups.erase(w.groups.begin() + static_cast<long>(i));
      complete(w, g);
    } else {
      ++i;
    }
  }
  yield_to_scheduler(t, true);
  __builtin_unreachable();
}

void fiber_main(void* arg) {
  auto* t = static_cast<ThreadState*>(arg);
  Runtime& r = R();
#ifdef RF_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
  try {
    r.thunk(r.thunk_ctx);
  } catch (const std::exception& e) {
    fiber_fail(cudaErrorLaunchFailure, fmt("a C++ exception escaped the kernel: %s", e.what()));
  } catch (...) {
    fiber_fail(cudaErrorLaunchFailure, "a C++ exception escaped the kernel");
  }
  thread_exit(t);
}

void resume(ThreadState* t) {
  Runtime& r = R();
  r.cur = t;
  g_thread_idx = t->tid;
  ++r.stats.switches;
#ifdef RF_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake, t->stack, t->stack_size);
#endif
  ctx_switch(r.sched, t->ctx);
#ifdef RF_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
  r.cur = nullptr;
}

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("emulation: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
  return static_cast<char*>(p) + page;
}

// ============================================================================= kernels and their static shared memory
struct Symbols {
  bool loaded = false;
  std::string error;
  std::unordered_map<uintptr_t, std::string> funcs;           // address -> mangled name
  std::vector<std::pair<std::string, StaticVar>> locals;      // writable _ZZ<function>E<name> objects
};

Symbols& symbols() {
  static Symbols s;
  if (s.loaded) return s;
  s.loaded = true;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&symbols), &info) == 0 || info.dli_fname == nullptr) {
    s.error = "dladdr found no module";
    return s;
  }
  const int fd = open(info.dli_fname, O_RDONLY | O_CLOEXEC);
  struct stat st{};
  if (fd < 0 || fstat(fd, &st) != 0) {
    if (fd >= 0) close(fd);
    s.error = fmt("cannot read %s", info.dli_fname);
    return s;
  }
  const size_t len = static_cast<size_t>(st.st_size);
  void* map = mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    s.error = fmt("cannot map %s", info.dli_fname);
    return s;
  }
  const auto* base = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  if (len < sizeof(Elf64_Ehdr) || std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
      eh->e_ident[EI_CLASS] != ELFCLASS64) {
    munmap(map, len);
    s.error = fmt("%s is not a 64-bit ELF file", info.dli_fname);
    return s;
  }
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
  const Elf64_Shdr* symtab = nullptr;
  for (int i = 0; i < eh->e_shnum; ++i)
    if (sh[i].sh_type == SHT_SYMTAB) symtab = &sh[i];
  if (symtab == nullptr) {
    munmap(map, len);
    s.error = fmt("%s has no symbol table (was it stripped?)", info.dli_fname);
    return s;
  }
  const char* strtab = base + sh[symtab->sh_link].sh_offset;
  const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + symtab->sh_offset);
  const size_t nsyms = symtab->sh_size / sizeof(Elf64_Sym);
  const auto load = reinterpret_cast<uintptr_t>(info.dli_fbase);
  for (size_t i = 0; i < nsyms; ++i) {
    const Elf64_Sym& y = syms[i];
    if (y.st_shndx == SHN_UNDEF || y.st_shndx >= SHN_LORESERVE || y.st_name == 0) continue;
    const char* name = strtab + y.st_name;
    const int type = ELF64_ST_TYPE(y.st_info);
    if (type == STT_FUNC) {
      s.funcs.emplace(load + y.st_value, name);
    } else if (type == STT_OBJECT && std::strncmp(name, "_ZZ", 3) == 0 && (sh[y.st_shndx].sh_flags & SHF_WRITE)) {
      s.locals.push_back({name, StaticVar{load + y.st_value, y.st_size}});
    }
  }
  munmap(map, len);
  return s;
}

std::string demangle(const std::string& m) {
  int status = 0;
  char* d = abi::__cxa_demangle(m.c_str(), nullptr, nullptr, &status);
  std::string out = (status == 0 && d != nullptr) ? d : m;
  std::free(d);
  return out;
}

// The kernel's static __shared__ variables are its function's static locals: the symbols
// _ZZ<the kernel's mangled name without _Z>E<variable>.
KernelInfo& kernel_info(const void* kernel, const char* fallback_name) {
  Runtime& r = R();
  auto it = r.kernels.find(kernel);
  if (it != r.kernels.end()) return it->second;
  KernelInfo k;
  Symbols& s = symbols();
  if (!s.error.empty()) throw std::runtime_error("emulation: cannot find the kernels' shared variables: " + s.error);
  auto f = s.funcs.find(reinterpret_cast<uintptr_t>(kernel));
  if (f == s.funcs.end()) throw std::runtime_error(fmt("emulation: no symbol for kernel %s", fallback_name));
  k.name = demangle(f->second);
  if (f->second.rfind("_Z", 0) == 0) {
    const std::string prefix = "_ZZ" + f->second.substr(2) + "E";
    for (auto& [name, var] : s.locals) {
      if (name.rfind(prefix, 0) != 0) continue;
      k.statics.push_back(var);
      k.static_bytes += (var.size + 15) & ~size_t{15};
    }
  }
  return r.kernels.emplace(kernel, std::move(k)).first->second;
}

// [p, p + n) lies inside one shared variable of the running kernel or inside the dynamic arena.
bool in_shared(const void* p, size_t n) {
  Runtime& r = R();
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto d = reinterpret_cast<uintptr_t>(r.dyn);
  if (r.dyn != nullptr && a >= d && a + n <= d + r.dyn_size) return true;
  for (const StaticVar& v : r.kernel->statics)
    if (a >= v.addr && a + n <= v.addr + v.size) return true;
  return false;
}

#ifdef RF_EMU_ASAN
__attribute__((no_sanitize_address))
#endif
void poison(void* p, size_t n) {
  auto* c = static_cast<volatile unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) c[i] = 0xff;
}

// ============================================================================= collectives
enum Op : int { kOpSyncwarp = 1, kOpShfl = 2, kOpVote = 3, kOpLdmatrix = 4, kOpMma = 5 };

ThreadState& lane_state(const Warp& w, int lane) {
  Runtime& r = R();
  return r.threads[static_cast<size_t>(&w - r.warps.data()) * 32 + static_cast<size_t>(lane)];
}

// Waits until every lane named in `mask` has arrived (lanes that exited count as arrived unless the
// instruction is .aligned, which needs all 32); the last to arrive computes everyone's results.
void arrive(int kind, unsigned mask, bool aligned, const char* what) {
  Runtime& r = R();
  ThreadState* t = r.cur;
  Warp& w = r.warps[t->warp];
  const unsigned bit = 1u << t->lane;
  ++r.stats.collectives;
  t->what = what;
  if (!(mask & bit))
    fiber_fail(cudaErrorIllegalInstruction, fmt("%s: the calling lane %d is not in its member mask 0x%08x", what,
                                                t->lane, mask));
  if (mask & ~w.exists)
    fiber_fail(cudaErrorIllegalInstruction,
               fmt("%s: member mask 0x%08x names lanes %s that are not in the block", what, mask,
                   lanes_str(mask & ~w.exists).c_str()));
  if (aligned && (w.exited & mask))
    fiber_fail(cudaErrorIllegalInstruction, fmt("%s needs all 32 lanes (.sync.aligned) but lanes %s have exited",
                                                what, lanes_str(w.exited & mask).c_str()));
  Group* g = nullptr;
  for (Group& x : w.groups) {
    if (x.mask == mask) {
      g = &x;
    } else if (x.mask & mask) {
      fiber_fail(cudaErrorIllegalInstruction,
                 fmt("divergent warp collectives: lane %d reached %s with mask 0x%08x while lanes %s wait at %s "
                     "with mask 0x%08x",
                     t->lane, what, mask, lanes_str(x.arrived).c_str(), x.what, x.mask));
    }
  }
  if (g == nullptr) {
    w.groups.push_back(Group{mask, 0u, kind, aligned, what});
    g = &w.groups.back();
  } else if (g->kind != kind) {
    fiber_fail(cudaErrorIllegalInstruction,
               fmt("divergent warp collectives: lane %d reached %s while lanes %s wait at %s", t->lane, what,
                   lanes_str(g->arrived).c_str(), g->what));
  }
  g->arrived |= bit;
  if (((g->arrived | w.exited) & mask) == mask) {
    const Group done = *g;
    w.groups.erase(w.groups.begin() + (g - w.groups.data()));
    complete(w, done);
    return;
  }
  t->st = St::kCollective;
  --r.ready;
  yield_to_scheduler(t, false);
}

uint32_t lane_word(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint16_t lane_half(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

float frag_float(MmaType type, uint16_t bits) {
  return bits_f32(type == kMmaF16 ? f16_bits_to_f32_bits(bits) : bf16_bits_to_f32_bits(bits));
}

void complete(Warp& w, const Group& g) {
  Runtime& r = R();
  const int op = g.kind >> 8, sub = g.kind & 0xff;
  if (op == kOpShfl) {
    // PTX shfl.sync: b = source lane / delta / lane mask, c = clamp | segmask << 8
    for (int i = 0; i < 32; ++i) {
      if (!(g.arrived >> i & 1u)) continue;
      ThreadState& t = lane_state(w, i);
      const int b = static_cast<int>(t.in[1]) & 31, c = static_cast<int>(t.in[2]);
      const int cval = c & 31, segmask = (c >> 8) & 31;
      const int max_lane = (i & segmask) | (cval & ~segmask), min_lane = i & segmask;
      int j = i;
      bool in_range = true;
      switch (static_cast<ShflMode>(sub)) {
        case ShflMode::kUp: j = i - b; in_range = j >= max_lane; break;
        case ShflMode::kDown: j = i + b; in_range = j <= max_lane; break;
        case ShflMode::kBfly: j = i ^ b; in_range = j <= max_lane; break;
        case ShflMode::kIdx: j = min_lane | (b & ~segmask); in_range = j <= max_lane; break;
      }
      if (!in_range) j = i;
      // a source lane outside the member mask or exited: undefined on a GPU, NaN here
      t.out[0] = (g.arrived >> j & 1u) ? lane_state(w, j).in[0] : 0xffffffffu;
    }
  } else if (op == kOpVote) {
    unsigned ballot = 0;
    for (int i = 0; i < 32; ++i)
      if ((g.arrived >> i & 1u) && lane_state(w, i).in[0]) ballot |= 1u << i;
    const unsigned v = sub == 0 ? ballot : (sub == 1 ? (ballot != 0) : (ballot == g.arrived));
    for (int i = 0; i < 32; ++i)
      if (g.arrived >> i & 1u) lane_state(w, i).out[0] = v;
  } else if (op == kOpLdmatrix) {
    // ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 hold the 16-byte row
    // addresses of matrix i; lane t receives, per matrix, row t/4 columns 2(t%4), 2(t%4)+1 (.trans:
    // rows 2(t%4), 2(t%4)+1 of column t/4), the first in the low half of the register.
    const int num = sub & 7;
    const bool trans = (sub & 8) != 0;
    const char* rows[32];
    for (int i = 0; i < 8 * num; ++i) {
      rows[i] = static_cast<const char*>(lane_state(w, i).ptr);
      if (reinterpret_cast<uintptr_t>(rows[i]) % 16 != 0)
        fiber_fail(cudaErrorMisalignedAddress,
                   fmt("%s: lane %d's row address %p is not 16-byte aligned", g.what, i, rows[i]));
      if (!in_shared(rows[i], 16))
        fiber_fail(cudaErrorIllegalAddress,
                   fmt("%s: lane %d's row address %p (16 bytes) is not inside the block's shared memory", g.what, i,
                       rows[i]));
    }
    for (int t = 0; t < 32; ++t) {
      ThreadState& s = lane_state(w, t);
      for (int m = 0; m < num; ++m) {
        if (!trans) {
          s.out[m] = lane_word(rows[8 * m + t / 4] + 4 * (t % 4));
        } else {
          const uint32_t lo = lane_half(rows[8 * m + 2 * (t % 4)] + 2 * (t / 4));
          const uint32_t hi = lane_half(rows[8 * m + 2 * (t % 4) + 1] + 2 * (t / 4));
          s.out[m] = lo | hi << 16;
        }
      }
    }
  } else if (op == kOpMma) {
    // mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, lane = 4 * g + c:
    //   A (16 x 16): register r holds row g + 8 (r % 2), columns 2c + 8 (r / 2) and + 1
    //   B (16 x 8):  register r holds rows 2c + 8r and + 1 of column g
    //   C, D (16 x 8 fp32): element e is row g + 8 (e / 2), column 2c + e % 2
    // Each element of D is the exact sum of the 16 exact products and C, rounded once to fp32.
    const auto type = static_cast<MmaType>(sub);
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const ThreadState& s = lane_state(w, l);
      const int gi = l / 4, ci = l % 4;
      for (int reg = 0; reg < 4; ++reg)
        for (int h = 0; h < 2; ++h)
          A[gi + 8 * (reg % 2)][2 * ci + h + 8 * (reg / 2)] =
              frag_float(type, static_cast<uint16_t>(s.in[reg] >> (16 * h)));
      for (int reg = 0; reg < 2; ++reg)
        for (int h = 0; h < 2; ++h)
          B[2 * ci + h + 8 * reg][gi] = frag_float(type, static_cast<uint16_t>(s.in[4 + reg] >> (16 * h)));
      for (int e = 0; e < 4; ++e) C[gi + 8 * (e / 2)][2 * ci + e % 2] = bits_f32(s.in[6 + e]);
    }
    for (int l = 0; l < 32; ++l) {
      ThreadState& s = lane_state(w, l);
      const int gi = l / 4, ci = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = gi + 8 * (e / 2), col = 2 * ci + e % 2;
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * static_cast<double>(B[k][col]);
        s.out[e] = f32_bits(static_cast<float>(acc));
      }
    }
  }
  // everyone else who waited for this collective may run again
  for (int i = 0; i < 32; ++i) {
    if (!(g.arrived >> i & 1u)) continue;
    ThreadState& t = lane_state(w, i);
    if (t.st == St::kCollective) {
      t.st = St::kReady;
      ++r.ready;
    }
  }
}

// ============================================================================= the scheduler
uint64_t next_rand(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string deadlock_report() {
  Runtime& r = R();
  std::string s = fmt("deadlock: %d of %d live threads wait at __syncthreads", r.at_barrier, r.live);
  for (size_t wi = 0; wi < r.warps.size(); ++wi) {
    for (const Group& g : r.warps[wi].groups)
      s += fmt("; warp %zu lanes %s wait at %s for lanes %s", wi, lanes_str(g.arrived).c_str(), g.what,
               lanes_str(g.mask & ~g.arrived & ~r.warps[wi].exited).c_str());
  }
  return s;
}

// Runs one block to completion; false after an error (recorded). `descending`: the warp-ahead
// schedules start from the last warp.
bool run_block(bool descending) {
  Runtime& r = R();
  const dim3 bd = g_block.dim;
  const int n = static_cast<int>(bd.x * bd.y * bd.z);
  if (static_cast<int>(r.threads.size()) < n) r.threads.resize(static_cast<size_t>(n));
  const int nw = (n + 31) / 32;
  r.warps.assign(static_cast<size_t>(nw), Warp{});
  for (int i = 0; i < n; ++i) {
    ThreadState& t = r.threads[static_cast<size_t>(i)];
    if (t.stack == nullptr) {
      t.stack = new_stack();
      t.stack_size = kStackSize;
    }
#ifdef RF_EMU_ASAN
    // fiber_main, thread_exit and yield_to_scheduler never return, so the redzones of their frames
    // stay poisoned at the top of the stack; an abandoned fiber (an error) left frames anywhere
    const size_t clean = t.stack_dirty ? t.stack_size : kStackTopFrames;
    __asan_unpoison_memory_region(t.stack + t.stack_size - clean, clean);
#endif
    t.stack_dirty = false;
    t.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.st = St::kReady;
    t.what = "";
    t.copies.clear();
    t.cp_group = 0;
    t.asan_fake = nullptr;
    r.warps[static_cast<size_t>(t.warp)].exists |= 1u << t.lane;
    ctx_init(t.ctx, t.stack, t.stack_size, &fiber_main, &t);
  }
  for (Warp& w : r.warps) w.exited = ~w.exists;  // lanes past the end of the block never run
  r.n = n;
  r.live = r.ready = n;
  r.at_barrier = 0;
  r.abort = false;
  ++r.stats.blocks;
  r.stats.threads += static_cast<uint64_t>(n);
  const auto sched = static_cast<Schedule>(r.schedule.load());
  auto& T = r.threads;
  auto go = [&](int i) {
    if (T[static_cast<size_t>(i)].st != St::kReady) return false;
    resume(&T[static_cast<size_t>(i)]);
    return true;
  };
  for (;;) {
    while (r.ready > 0 && !r.abort) {
      switch (sched) {
        case Schedule::kLockstep:
          for (int i = 0; i < n && !r.abort; ++i) go(i);
          break;
        case Schedule::kWarpAhead:
        case Schedule::kWarpAheadReverse:
          for (int k = 0; k < nw && !r.abort; ++k) {
            const int wi = descending ? nw - 1 - k : k;
            const int lo = 32 * wi, hi = std::min(n, lo + 32);
            for (bool any = true; any && !r.abort;) {
              any = false;
              for (int i = lo; i < hi && !r.abort; ++i) any |= go(i);
            }
          }
          break;
        case Schedule::kRandom: {
          int k = static_cast<int>(next_rand(r.rng) % static_cast<uint64_t>(r.ready));
          for (int i = 0; i < n; ++i) {
            if (T[static_cast<size_t>(i)].st != St::kReady) continue;
            if (k-- == 0) {
              go(i);
              break;
            }
          }
          break;
        }
      }
    }
    if (r.abort) {
      for (int i = 0; i < n; ++i)
        if (T[static_cast<size_t>(i)].st != St::kExited) T[static_cast<size_t>(i)].stack_dirty = true;
      return false;
    }
    if (r.live == 0) return true;
    if (r.at_barrier > 0 && r.at_barrier == r.live) {
      for (int i = 0; i < n; ++i)
        if (T[static_cast<size_t>(i)].st == St::kBarrier) T[static_cast<size_t>(i)].st = St::kReady;
      r.ready = r.live;
      r.at_barrier = 0;
      ++r.stats.barriers;
      continue;
    }
    record_error(cudaErrorLaunchTimeout, deadlock_report() + " (" + where() + "); a GPU would hang here");
    for (int i = 0; i < n; ++i)
      if (T[static_cast<size_t>(i)].st != St::kExited) T[static_cast<size_t>(i)].stack_dirty = true;
    return false;
  }
}

int default_schedule() {
  const char* env = std::getenv("ROBERTA_FAST_EMU_SCHEDULE");
  if (env == nullptr || *env == '\0') return static_cast<int>(Schedule::kWarpAhead);
  for (size_t i = 0; i < kScheduleNames.size(); ++i)
    if (kScheduleNames[i] == env) return static_cast<int>(i);
  std::fprintf(stderr, "roberta_fast._C_emu: unknown ROBERTA_FAST_EMU_SCHEDULE=%s, using warp_ahead\n", env);
  return static_cast<int>(Schedule::kWarpAhead);
}

void ensure_schedule() {
  Runtime& r = R();
  if (r.schedule.load() < 0) r.schedule.store(default_schedule());
}

}  // namespace

// ============================================================================= kernel-facing API
ThreadState* current(const char* what) {
  ThreadState* t = R().cur;
  if (t == nullptr) throw std::logic_error(std::string("emulation: ") + what + " called outside a kernel");
  return t;
}

void syncthreads() {
  Runtime& r = R();
  ThreadState* t = current("__syncthreads");
  t->what = "__syncthreads";
  t->st = St::kBarrier;
  --r.ready;
  ++r.at_barrier;
  yield_to_scheduler(t, false);
}

void syncwarp(unsigned mask) {
  current("__syncwarp");
  arrive(kOpSyncwarp << 8, mask, false, "__syncwarp");
}

uint32_t shfl(ShflMode mode, unsigned mask, uint32_t value, int b, int c) {
  ThreadState* t = current("a shuffle");
  t->in[0] = value;
  t->in[1] = static_cast<uint32_t>(b);
  t->in[2] = static_cast<uint32_t>(c);
  static const char* names[] = {"shfl.sync.idx", "shfl.sync.up", "shfl.sync.down", "shfl.sync.bfly"};
  arrive(kOpShfl << 8 | static_cast<int>(mode), mask, false, names[static_cast<int>(mode)]);
  return t->out[0];
}

unsigned vote(int kind, unsigned mask, bool pred) {
  ThreadState* t = current("a vote");
  t->in[0] = pred ? 1u : 0u;
  static const char* names[] = {"vote.sync.ballot", "vote.sync.any", "vote.sync.all"};
  arrive(kOpVote << 8 | kind, mask, false, names[kind]);
  return t->out[0];
}

void cp_async(void* dst, const void* src, int cp_size, int src_size) {
  ThreadState* t = current("cp.async");
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    fiber_fail(cudaErrorIllegalInstruction, fmt("cp.async: cp-size %d (4, 8 or 16)", cp_size));
  if (src_size < 0 || src_size > cp_size)
    fiber_fail(cudaErrorIllegalInstruction, fmt("cp.async: src-size %d outside [0, %d]", src_size, cp_size));
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<unsigned>(cp_size) != 0 ||
      reinterpret_cast<uintptr_t>(src) % static_cast<unsigned>(cp_size) != 0)
    fiber_fail(cudaErrorMisalignedAddress,
               fmt("cp.async: dst %p or src %p is not %d-byte aligned", dst, src, cp_size));
  if (!in_shared(dst, static_cast<size_t>(cp_size)))
    fiber_fail(cudaErrorIllegalAddress,
               fmt("cp.async: dst %p (%d bytes) is not inside the block's shared memory", dst, cp_size));
  t->copies.push_back(Copy{static_cast<char*>(dst), static_cast<const char*>(src), cp_size, src_size, t->cp_group});
}

void cp_async_commit() { ++current("cp.async.commit_group")->cp_group; }

void cp_async_wait_all() {
  ThreadState* t = current("cp.async.wait_all");
  for (Copy& c : t->copies) land(c);
  t->copies.clear();
}

void ldmatrix(uint32_t* out, const void* p, int num, bool trans) {
  ThreadState* t = current("ldmatrix");
  t->ptr = p;
  static const char* names[2][5] = {
      {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
      {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  arrive(kOpLdmatrix << 8 | num | (trans ? 8 : 0), kFull, true, names[trans][num]);
  for (int i = 0; i < num; ++i) out[i] = t->out[i];
}

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ThreadState* t = current("mma.sync");
  for (int i = 0; i < 4; ++i) t->in[i] = a[i];
  t->in[4] = b0;
  t->in[5] = b1;
  for (int i = 0; i < 4; ++i) t->in[6 + i] = f32_bits(d[i]);
  arrive(kOpMma << 8 | static_cast<int>(type), kFull, true,
         type == kMmaF16 ? "mma.sync.m16n8k16.f32.f16" : "mma.sync.m16n8k16.f32.bf16");
  for (int i = 0; i < 4; ++i) d[i] = bits_f32(t->out[i]);
}

void* dynamic_smem() { return R().dyn; }

// ============================================================================= launches
void launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, Thunk thunk, void* ctx) {
  Runtime& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  ensure_schedule();
  t_error.in_launch_recorded = false;
  ++r.stats.launches;
  r.launch_name = name;
  r.kernel = nullptr;
  KernelInfo* k = nullptr;
  try {
    k = &kernel_info(kernel, name);
  } catch (const std::exception& e) {
    record_error(cudaErrorInvalidDeviceFunction, e.what());
    return;
  }
  r.kernel = k;
  const unsigned long threads = static_cast<unsigned long>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > static_cast<unsigned long>(kMaxThreadsPerBlock)) {
    record_error(cudaErrorInvalidConfiguration,
                 fmt("%s: block (%u,%u,%u) = %lu threads (at most %d per block, x, y <= 1024, z <= 64)",
                     k->name.c_str(), block.x, block.y, block.z, threads, kMaxThreadsPerBlock));
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    record_error(cudaErrorInvalidConfiguration,
                 fmt("%s: grid (%u,%u,%u) (each dimension >= 1, x < 2^31, y and z <= 65535)", k->name.c_str(),
                     grid.x, grid.y, grid.z));
    return;
  }
  if (k->static_bytes > kDefaultSharedPerBlock) {
    record_error(cudaErrorInvalidValue, fmt("%s: %zu bytes of static shared memory (at most 48 KB)",
                                            k->name.c_str(), k->static_bytes));
    return;
  }
  const size_t max_dyn = k->max_dyn >= 0 ? static_cast<size_t>(k->max_dyn) : kDefaultSharedPerBlock - k->static_bytes;
  if (smem > max_dyn) {
    record_error(cudaErrorInvalidValue,
                 fmt("%s: %zu bytes of dynamic shared memory requested, the kernel allows %zu (%zu bytes static; "
                     "above 48 KB in all needs cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize))",
                     k->name.c_str(), smem, max_dyn, k->static_bytes));
    return;
  }
  void* dyn = nullptr;
  if (posix_memalign(&dyn, 128, smem == 0 ? 1 : smem) != 0) {
    record_error(cudaErrorLaunchOutOfResources, "emulation: cannot allocate dynamic shared memory");
    return;
  }
  r.dyn = static_cast<char*>(dyn);
  r.dyn_size = smem;
  r.thunk = thunk;
  r.thunk_ctx = ctx;
  const auto sched = static_cast<Schedule>(r.schedule.load());
  r.rng = r.seed;
  // block order: grid order, reversed for warp_ahead_reverse, shuffled for random
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (sched == Schedule::kRandom) {
    order.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
    for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[next_rand(r.rng) % i]);
  }
  for (uint64_t j = 0; j < nblocks; ++j) {
    const uint64_t b = sched == Schedule::kRandom ? order[j]
                       : sched == Schedule::kWarpAheadReverse ? nblocks - 1 - j
                                                              : j;
    g_block.idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    g_block.dim = block;
    g_block.grid = grid;
    for (const StaticVar& v : k->statics) poison(reinterpret_cast<void*>(v.addr), v.size);
    poison(r.dyn, smem);
    // warp_ahead alternates the warp order between consecutive blocks (so a launch of two or more
    // blocks runs both the "producer warp first" and the "consumer warp first" orders); _reverse
    // starts with the other one
    const bool descending = ((j & 1u) != 0) != (sched == Schedule::kWarpAheadReverse);
    if (!run_block(descending)) break;
  }
  std::free(dyn);
  r.dyn = nullptr;
  r.dyn_size = 0;
  r.kernel = nullptr;
  t_error.in_launch_recorded = false;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  Runtime& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  t_error.in_launch_recorded = false;
  KernelInfo* k = nullptr;
  try {
    k = &kernel_info(kernel, "kernel");
  } catch (const std::exception& e) {
    record_error(cudaErrorInvalidDeviceFunction, e.what());
    return cudaErrorInvalidDeviceFunction;
  }
  if (bytes < 0 || static_cast<size_t>(bytes) + k->static_bytes > kMaxSharedPerBlockOptin) {
    record_error(cudaErrorInvalidValue,
                 fmt("cudaFuncSetAttribute(%s, MaxDynamicSharedMemorySize, %d): with %zu bytes static that exceeds "
                     "the %zu bytes a block may opt in to",
                     k->name.c_str(), bytes, k->static_bytes, kMaxSharedPerBlockOptin));
    return cudaErrorInvalidValue;
  }
  k->max_dyn = bytes;
  return cudaSuccess;
}

cudaError_t get_last_error(bool reset) {
  const cudaError_t e = t_error.code;
  if (reset) t_error.code = cudaSuccess;
  return e;
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* error_string(cudaError_t e) {
  if (e != cudaSuccess && e == t_error.message_code) return t_error.message.c_str();
  return e == cudaSuccess ? "no error" : "unknown error";
}

// ============================================================================= controls (runtime.h)
const std::vector<std::string>& schedules() { return kScheduleNames; }

void set_schedule(const std::string& name, uint64_t seed) {
  Runtime& r = R();
  for (size_t i = 0; i < kScheduleNames.size(); ++i) {
    if (kScheduleNames[i] == name) {
      std::lock_guard<std::mutex> lock(r.mu);
      r.schedule.store(static_cast<int>(i));
      r.seed = seed;
      return;
    }
  }
  std::string all;
  for (const auto& s : kScheduleNames) all += (all.empty() ? "" : ", ") + s;
  throw std::invalid_argument("unknown schedule '" + name + "' (one of " + all + ")");
}

std::string schedule_name() {
  ensure_schedule();
  return kScheduleNames[static_cast<size_t>(R().schedule.load())];
}

uint64_t schedule_seed() { return R().seed; }

Stats stats() { return R().stats; }
void reset_stats() { R().stats = Stats{}; }

std::pair<size_t, size_t> static_shared(const void* kernel) {
  Runtime& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  KernelInfo& k = kernel_info(kernel, "kernel");
  return {k.static_bytes, k.statics.size()};
}

}  // namespace rf_emu
