// A parallel loop over units of work that balances itself as it runs.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

// Runs body(next) once on each of up to `threads` of torch's intra-op threads; next() returns
// a unit of [0, units) that no thread has taken yet, or -1 once all are taken. Each thread owns
// an equal, contiguous share of the units and takes it front to back, reading memory in the
// order a static split would; done with it, it takes the other shares' last units, one at a
// time from the back. A decode call lasts ~10-200 us, and with a static split the thread whose
// reads ran slower in that call (or whose rows held more keys) was waited for.
template <typename Body>
void balanced_for(int64_t units, int64_t threads, const Body& body) {
  const int64_t T =
      std::max<int64_t>(1, std::min({threads, units, (int64_t)at::get_num_threads()}));
  // share t's units not yet taken, [front, back) as front | back << 32, a cache line each, so
  // that takes from a thread's own share do not contend with its partner's
  struct alignas(64) Share {
    std::atomic<uint64_t> left;
  };
  std::vector<Share> shares(T);
  for (int64_t t = 0; t < T; ++t)
    shares[t].left = (uint64_t)(units * t / T) | (uint64_t)(units * (t + 1) / T) << 32;
  auto take = [&](int64_t t, bool front) -> int64_t {
    std::atomic<uint64_t>& left = shares[t].left;
    uint64_t v = left.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = v & 0xffffffffu, b = v >> 32;
      if (f >= b) return -1;
      if (left.compare_exchange_weak(v, front ? (f + 1) | b << 32 : f | (b - 1) << 32,
                                     std::memory_order_relaxed))
        return front ? (int64_t)f : (int64_t)b - 1;
    }
  };
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {  // one t a thread, all of them where it runs alone
      int64_t other = 0;                 // whose share next() takes from: t + other
      body([&]() -> int64_t {
        for (; other < T; ++other) {
          const int64_t u = take((t + other) % T, other == 0);
          if (u >= 0) return u;
        }
        return -1;
      });
    }
  });
}
