// Dynamic work sharing for independent items (used to run whole sequences of a batch in parallel).
//
// Why not OpenMP: an OpenMP region ends at a barrier that waits for every team thread, so when another process
// holds a core, each region waits for the descheduled thread (measured: 2 threads 5-10x slower than 1 on a shared
// 2-core machine). Here items are claimed one at a time from an atomic counter and the caller claims too, so it
// only ever waits for items a worker has actually started. Every participant runs its items single-threaded
// (OpenMP/ATen/oneDNN see 1 thread), so items never nest parallel regions.
#pragma once

#include <cstdint>
#include <functional>

namespace qaengine::cpu {

/// Runs fn(0) ... fn(n - 1) on up to `threads` threads (the caller plus threads - 1 pool workers) and returns when
/// all are done. Rethrows the first exception an item threw.
void run_items(int64_t n, int threads, const std::function<void(int64_t)>& fn);

/// With `on`, every multi-threaded run_items first releases the calling thread's own OpenMP team (torch's intra-op
/// threads when the caller ran torch ops): libgomp keeps those threads spinning for GOMP_SPINCOUNT iterations after
/// each parallel region (by default about 8 ms of CPU here), on the cores the pool is about to use. The team is
/// rebuilt by its next parallel region (one thread start). Off by default; engine.openmp turns it on for processes
/// whose libgomp started before a bounded spin count could be set (docs/CPP.md "Threads").
void set_release_caller_team(bool on);
bool release_caller_team();

}  // namespace qaengine::cpu
