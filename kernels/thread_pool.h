// A persistent pool of worker threads: a call to the kernel wakes them instead of spawning
// new threads (which costs tens of microseconds each, a lot next to a small search).
#pragma once

#include <functional>

namespace clapedge {

// Number of hardware threads (at least 1).
int hardware_threads();

// Runs fn(0), ..., fn(threads - 1) concurrently, fn(0) on the calling thread, and returns when
// all have finished. One job runs at a time (concurrent callers wait); a call from inside a
// job runs serially. fn must not throw.
void parallel_run(int threads, const std::function<void(int)>& fn);

}  // namespace clapedge
