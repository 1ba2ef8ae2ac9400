#include "thread_pool.h"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define CLAPEDGE_HAVE_GETPID 1
#endif

namespace clapedge {

namespace {

thread_local bool tl_in_job = false;

class Pool {
 public:
  void run(int threads, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> one_job(run_mu_);
    grow(threads - 1);
    {
      std::lock_guard<std::mutex> l(mu_);
      fn_ = &fn;
      count_ = threads;
      pending_ = threads - 1;
      ++generation_;
    }
    start_.notify_all();
    tl_in_job = true;
    fn(0);
    tl_in_job = false;
    std::unique_lock<std::mutex> l(mu_);
    done_.wait(l, [&] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void grow(int workers) {
    while (workers_ < workers) {
      const int id = ++workers_;
      // Detached and never joined: the pool lives until the process exits.
      std::thread([this, id] { loop(id); }).detach();
    }
  }

  void loop(int id) {
    tl_in_job = true;
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> l(mu_);
        start_.wait(l, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= count_) continue;
        fn = fn_;
      }
      (*fn)(id);
      std::lock_guard<std::mutex> l(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  uint64_t generation_ = 0;
  int count_ = 0;
  int pending_ = 0;
  int workers_ = 0;
};

Pool& pool() {
  // Leaked on purpose (no exit-time teardown of detached threads). After fork() the child
  // has none of the parent's workers, so it starts a fresh pool.
  static Pool* p = nullptr;
#ifdef CLAPEDGE_HAVE_GETPID
  static pid_t owner = 0;
  static std::mutex mu;
  std::lock_guard<std::mutex> l(mu);
  if (p == nullptr || owner != getpid()) {
    p = new Pool();
    owner = getpid();
  }
#else
  if (p == nullptr) p = new Pool();
#endif
  return *p;
}

}  // namespace

int hardware_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

void parallel_run(int threads, const std::function<void(int)>& fn) {
  if (threads <= 1 || tl_in_job) {
    for (int t = 0; t < std::max(threads, 1); ++t) fn(t);
    return;
  }
  pool().run(threads, fn);
}

}  // namespace clapedge
