// Controls of the emulation runtime (csrc/emu/runtime.cpp) for the module's `emu` submodule:
// the thread schedule, counters, and the shared-memory inventory of a kernel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rf_emu {

// How the fibers of a block take turns (each runs until it blocks: barrier, warp collective, exit):
//   lockstep            thread 0, 1, ..., n-1, 0, 1, ...: every thread advances one step per round,
//                       so the warps move in lockstep
//   warp_ahead          (the default) one warp runs until all its lanes wait at a block barrier (or
//                       exited), then the next: warps 0, 1, ... in even blocks and from the last warp
//                       down in odd blocks (the k-th block run), blocks in grid order; a missing
//                       barrier between warps then shows up whichever warp produces the data
//   warp_ahead_reverse  the same with the warp orders swapped and the blocks in reverse grid order
//   random              a seeded random ready thread at every step, blocks in a seeded random order
//                       (the seed is the same for every launch, so a run is reproducible)
const std::vector<std::string>& schedules();
void set_schedule(const std::string& name, uint64_t seed);  // throws std::invalid_argument
std::string schedule_name();
uint64_t schedule_seed();

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, barriers = 0, collectives = 0;
};
Stats stats();
void reset_stats();

// Static shared variables the runtime found for a kernel: (bytes in total, how many variables),
// or throws std::runtime_error when the module's symbol table cannot be read.
std::pair<size_t, size_t> static_shared(const void* kernel);

}  // namespace rf_emu
