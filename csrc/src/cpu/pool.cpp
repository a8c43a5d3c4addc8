#include "pool.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qaengine::cpu {
namespace {

// How long a thread busy-waits (for new items, or for the last items of a job) before it sleeps on a condition
// variable. A forward makes two run_items calls per layer; waking a sleeping thread costs tens of microseconds on
// a VM, which at batch 1 ate most of the second thread's gain. Spinning this long covers the gaps inside one
// forward and costs an idle core at most this much after the last one (OpenMP's KMP_BLOCKTIME, in small).
constexpr auto kSpin = std::chrono::microseconds(300);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() holds or kSpin has passed; returns pred().
template <class Pred>
bool spin_until(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) return pred();
  }
}

std::atomic<bool> g_release_caller_team{false};

// Ends the spinning of the calling thread's idle OpenMP team (a no-op when it has none, e.g. after the last call).
void release_openmp_team() {
  omp_pause_resource(omp_pause_soft, omp_get_initial_device());
}

// One batch of items in flight.
struct Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;
  std::exception_ptr error;

  // Claims and runs items until none are left.
  void work() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// OpenMP (hence ATen's intra-op pool and oneDNN) at one thread for the calling thread only.
class SingleThreadedScope {
 public:
  SingleThreadedScope() : saved_((at::internal::lazy_init_num_threads(), omp_get_max_threads())) {
    omp_set_num_threads(1);
  }
  ~SingleThreadedScope() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destruction order
    return *pool;
  }

  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    if (g_release_caller_team.load(std::memory_order_relaxed)) release_openmp_team();
    std::lock_guard<std::mutex> one_job(run_mutex_);  // concurrent callers take turns
    ensure_workers(threads - 1);
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      wanted_ = threads - 1;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    {
      SingleThreadedScope single;
      job->work();
    }
    // wait only for items that workers have claimed and not finished
    if (!spin_until([&] { return job->done.load(std::memory_order_acquire) >= n; })) {
      std::unique_lock<std::mutex> lock(job->mutex);
      job->finished.wait(lock, [&] { return job->done.load(std::memory_order_acquire) >= n; });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
      workers_.back().detach();
    }
  }

  void loop(int index) {
    at::internal::lazy_init_num_threads();  // else ATen's first parallel_for here would reset the count below
    omp_set_num_threads(1);
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        if (index >= wanted_) continue;  // this job asked for fewer threads
        job = job_;
      }
      if (job) {
        // Again per job: measured, a worker's OpenMP thread count went back to the process default between jobs
        // (after the OpenMP regions of ATen's parallel_for ran on it), and oneDNN's and ATen's regions then started
        // a second team whose spinning thread took a core from the pool (8x384: 152 ms instead of 81).
        omp_set_num_threads(1);
        job->work();
      }
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  int wanted_ = 0;
};

}  // namespace

void set_release_caller_team(bool on) {
  g_release_caller_team.store(on, std::memory_order_relaxed);
}

bool release_caller_team() {
  return g_release_caller_team.load(std::memory_order_relaxed);
}

void run_items(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Pool::instance().run(n, threads, fn);
}

}  // namespace qaengine::cpu
