// Copy-on-write checkpoints on a sync write-protect userfaultfd.
//
// One CowSession per tracked QEMU. Guest RAM is divided into grains (a power
// of two, 4 KiB .. 2 MiB). A grain is either write-protected (clean since the
// last pause) or not (dirty: its first write faulted and was recorded).
//
//   handler thread  serves every write-protect fault: if the grain is pending
//                   (dirty at the last pause, not yet copied) it copies the
//                   grain into its staging slot first, then records the grain
//                   dirty and un-protects it, which wakes the writer.
//   copier thread   once the VM runs again (cowStartCopy), copies pending grains in order into a
//                   ring of staging slots that JavaScript drains to the store.
//   prearm()        just before the pause, while the VM runs: the dirty grains
//                   are write-protected again (still dirty).
//   collect()       in the pause: dirty grains become pending, get slots in
//                   ascending order; only grains written since prearm() need
//                   protecting again. Its cost follows that small set, not the
//                   dirty set or the RAM size (no page walk).
//
// All grain state is under one mutex; a grain's content is copied and its
// protection dropped while holding it, so no write can land on a pending grain
// before its copy. A writer never waits for the store: a grain whose ring
// slot is still in use is copied to a spill buffer (moved into its slot by the
// copier later). Past maxSpillBytes of spill the
// checkpoint fails (every pending grain is dropped and marked dirty again, so
// the next checkpoint carries it) and the writer proceeds.
#include "common.h"

#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace hydra {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t NowNs() {
  return (uint64_t)std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

struct Cow {
  int uffd = -1, pidfd = -1, stopFd = -1;
  uint64_t start = 0, size = 0, grain = 0;
  uint64_t ngrains = 0;
  const uint8_t *ram = nullptr;  // read-only view of guest RAM (kept alive by JS)
  uint8_t *staging = nullptr;    // ring of slots (kept alive by JS)
  uint64_t slots = 0;
  uint64_t maxSpillBytes = 0;
  uint64_t spillBytes = 0;
  std::unordered_map<uint64_t, uint8_t *> spill;  // slot index -> grain copied by the handler before its slot was free

  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint64_t> dirty, pending;  // bitmaps, one bit per grain
  std::vector<uint64_t> unprot;          // grains not write-protected now (the handler let a write through)
  std::vector<uint32_t> order;           // pending grains in slot order
  std::vector<uint32_t> slotOf;          // grain -> index in order (valid while pending)
  uint64_t n = 0, copied = 0, released = 0;
  bool failed = false, stopping = false, stopped = false;
  bool go = false;  // the copier may run (set after `cont`: it must not compete with the device-state save)
  std::string failReason;
  int wpErrno = 0;  // last unexpected UFFDIO_WRITEPROTECT error

  // Since the last collect (reset there) / since start.
  uint64_t faults = 0, cowCopies = 0, spills = 0, serviceNsTotal = 0, serviceNsMax = 0;
  uint64_t totalFaults = 0, failures = 0;

  std::thread handler, copier;

  bool Test(const std::vector<uint64_t> &b, uint64_t g) const { return (b[g >> 6] >> (g & 63)) & 1; }
  static void Set(std::vector<uint64_t> &b, uint64_t g) { b[g >> 6] |= 1ull << (g & 63); }
  static void Clear(std::vector<uint64_t> &b, uint64_t g) { b[g >> 6] &= ~(1ull << (g & 63)); }

  // UFFDIO_WRITEPROTECT over [a, a+len); returns errno or 0. Un-protecting wakes the writers.
  int Protect(uint64_t a, uint64_t len, bool on) {
    struct uffdio_writeprotect wp = {};
    wp.range.start = a;
    wp.range.len = len;
    wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    for (int tries = 0;; tries++) {
      if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0) return 0;
      if ((errno == EAGAIN || errno == EINTR) && tries < 100000) continue;
      return errno;
    }
  }

  uint8_t *Slot(uint64_t k) { return staging + (k % slots) * grain; }

  void FreeSpill() {
    for (auto &e : spill) free(e.second);
    spill.clear();
    spillBytes = 0;
  }

  // Drop the checkpoint in progress: nothing pending, every grain of it dirty again. Holds mu.
  void FailLocked(const std::string &why) {
    if (failed || n == 0) return;
    failed = true;
    failures++;
    failReason = why;
    for (uint64_t k = 0; k < n; k++) {
      uint32_t g = order[k];
      Clear(pending, g);
      Set(dirty, g);
    }
    FreeSpill();
    cv.notify_all();
  }

  void Serve(uint64_t addr) {
    uint64_t t0 = NowNs();
    std::unique_lock<std::mutex> l(mu);
    if (addr < start || addr >= start + size) {
      // Not ours (cannot happen: only RAM is registered): let the writer go.
      Protect(addr & ~(PageSize() - 1), PageSize(), false);
      return;
    }
    uint64_t g = (addr - start) / grain;
    if (Test(pending, g)) {
      uint64_t k = slotOf[g];
      if (k < released + slots) {
        memcpy(Slot(k), ram + g * grain, grain);
        Clear(pending, g);
        cowCopies++;
        cv.notify_all();
      } else if (spillBytes + grain <= maxSpillBytes) {
        // Its slot is still in use (the store drains the ring behind the guest): the writer never
        // waits for the network, the grain goes to a spill buffer the copier moves into the slot later.
        uint8_t *p = (uint8_t *)malloc(grain);
        if (p) {
          memcpy(p, ram + g * grain, grain);
          spill[k] = p;
          spillBytes += grain;
          Clear(pending, g);
          cowCopies++;
          spills++;
        } else {
          FailLocked("no memory to spill a grain the guest wrote before it was copied");
        }
      } else {
        FailLocked("the guest wrote more uncopied grains than the spill limit holds (" + std::to_string(maxSpillBytes >> 20) + " MiB)");
      }
    }
    Set(dirty, g);
    Set(unprot, g);
    int e = Protect(start + g * grain, grain, false);
    if (e && e != ENOENT) wpErrno = e;
    uint64_t dt = NowNs() - t0;
    faults++;
    totalFaults++;
    serviceNsTotal += dt;
    if (dt > serviceNsMax) serviceNsMax = dt;
  }

  void HandlerLoop() {
    struct uffd_msg msgs[64];
    for (;;) {
      struct pollfd p[3] = {{uffd, POLLIN, 0}, {stopFd, POLLIN, 0}, {pidfd, POLLIN, 0}};
      int r = poll(p, pidfd >= 0 ? 3 : 2, -1);
      if (r < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (p[1].revents & POLLIN) return;
      if (pidfd >= 0 && (p[2].revents & POLLIN)) return;  // QEMU exited: no writer left to serve
      if (!(p[0].revents & POLLIN)) continue;
      for (;;) {
        ssize_t got = read(uffd, msgs, sizeof msgs);
        if (got < 0) break;  // EAGAIN: drained (the shim's uffd is O_NONBLOCK)
        size_t k = (size_t)got / sizeof(struct uffd_msg);
        for (size_t i = 0; i < k; i++)
          if (msgs[i].event == UFFD_EVENT_PAGEFAULT) Serve(msgs[i].arg.pagefault.address);
        if (k < 64) break;
      }
    }
  }

  void CopierLoop(int nice) {
    // Below QEMU: the copier must not take the core a vCPU or the device save needs.
    if (nice) setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
    std::unique_lock<std::mutex> l(mu);
    for (;;) {
      cv.wait(l, [&] { return stopping || (go && !failed && copied < n && copied < released + slots); });
      if (stopping) return;
      uint32_t g = order[copied];
      if (Test(pending, g)) {
        memcpy(Slot(copied), ram + (uint64_t)g * grain, grain);
        Clear(pending, g);
      } else if (!spill.empty()) {
        auto it = spill.find(copied);
        if (it != spill.end()) {
          memcpy(Slot(copied), it->second, grain);
          free(it->second);
          spill.erase(it);
          spillBytes -= grain;
        }
      }
      copied++;
      cv.notify_all();
      // Let a waiting fault handler in between grains.
      if ((copied & 15) == 0) {
        l.unlock();
        std::this_thread::yield();
        l.lock();
      }
    }
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu);
      if (stopped) return;
      stopped = true;
      stopping = true;
      FailLocked("protection stopped");
      cv.notify_all();
    }
    // Nothing may stay blocked: drop all protection (wakes every writer), then stop serving.
    Protect(start, size, false);
    struct uffdio_range r = {start, size};
    ioctl(uffd, UFFDIO_UNREGISTER, &r);
    uint64_t one = 1;
    if (write(stopFd, &one, sizeof one) < 0) { /* eventfd cannot be full */ }
    if (handler.joinable()) handler.join();
    if (copier.joinable()) copier.join();
    close(stopFd);
    stopFd = -1;
  }
};

Cow *Get(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) ThrowType(info.Env(), "CoW session handle expected");
  Cow *c = info[0].As<Napi::External<Cow>>().Data();
  if (c->stopped) ThrowErrno(info.Env(), "CoW session is closed", EBADF);
  return c;
}

// cowStart(uffd, pidfd, start, size, grain, ram: Buffer, staging: Buffer, maxSpillBytes, copierNice) -> handle
// uffd: UFFDIO_API done without WP_ASYNC, [start, size) registered in WP mode
// (not yet protected: cowArmAll does that). Starts the handler and copier.
Napi::Value CowStart(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int uffd = ArgFd(info, 0, "uffd");
  int pidfd = info[1].IsNumber() && info[1].As<Napi::Number>().Int32Value() >= 0 ? ArgFd(info, 1, "pidfd") : -1;
  uint64_t start = ArgU64(info, 2, "start"), size = ArgU64(info, 3, "size"), grain = ArgU64(info, 4, "grain");
  Napi::Buffer<uint8_t> ram = ArgBuffer(info, 5, "ram");
  Napi::Buffer<uint8_t> staging = ArgBuffer(info, 6, "staging");
  uint64_t maxSpillBytes = ArgU64(info, 7, "maxSpillBytes");
  uint64_t nice = info.Length() > 8 ? ArgU64(info, 8, "copierNice") : 0;
  if (grain < PageSize() || (grain & (grain - 1)) || grain > (2u << 20)) ThrowType(env, "grain must be a power of two from the page size to 2 MiB");
  if (size == 0 || size % grain || start % PageSize()) ThrowType(env, "RAM size must be a non-zero multiple of the grain, start page aligned");
  if (ram.Length() < size) ThrowType(env, "ram view shorter than the RAM size");
  if (staging.Length() < grain) ThrowType(env, "staging buffer smaller than one grain");
  if (size / grain > UINT32_MAX) ThrowType(env, "too many grains");
  int stopFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stopFd < 0) ThrowErrno(env, "eventfd", errno);
  Cow *c = new Cow();
  c->uffd = uffd;
  c->pidfd = pidfd;
  c->stopFd = stopFd;
  c->start = start;
  c->size = size;
  c->grain = grain;
  c->ngrains = size / grain;
  c->ram = ram.Data();
  c->staging = staging.Data();
  c->slots = staging.Length() / grain;
  c->maxSpillBytes = maxSpillBytes;
  c->dirty.assign((c->ngrains + 63) / 64, 0);
  c->pending.assign((c->ngrains + 63) / 64, 0);
  c->unprot.assign((c->ngrains + 63) / 64, 0);
  c->slotOf.assign(c->ngrains, 0);
  c->handler = std::thread([c] { c->HandlerLoop(); });
  c->copier = std::thread([c, nice] { c->CopierLoop((int)nice); });
  return Napi::External<Cow>::New(env, c, [](Napi::Env, Cow *p) {
    p->Stop();
    delete p;
  });
}

// cowArmAll(h) -> ms: write-protect all RAM and forget the dirty set (start of a full checkpoint).
Napi::Value CowArmAll(const Napi::CallbackInfo &info) {
  Cow *c = Get(info);
  std::lock_guard<std::mutex> l(c->mu);
  uint64_t t0 = NowNs();
  if (c->copied < c->n && !c->failed) ThrowErrno(info.Env(), "cowArmAll: a checkpoint copy is still in progress", EBUSY);
  int e = c->Protect(c->start, c->size, true);
  if (e) ThrowErrno(info.Env(), "ioctl(UFFDIO_WRITEPROTECT) of all guest RAM", e);
  std::fill(c->dirty.begin(), c->dirty.end(), 0);
  std::fill(c->unprot.begin(), c->unprot.end(), 0);
  return Napi::Number::New(info.Env(), (double)(NowNs() - t0) / 1e6);
}

// Runs [first grain, count) of the set bits of `bits`.
static void BitRuns(const std::vector<uint64_t> &bits, std::vector<std::pair<uint64_t, uint64_t>> &runs) {
  runs.clear();
  for (uint64_t w = 0; w < bits.size(); w++) {
    uint64_t b = bits[w];
    while (b) {
      uint64_t g = w * 64 + (uint64_t)__builtin_ctzll(b);
      b &= b - 1;
      if (!runs.empty() && runs.back().first + runs.back().second == g) runs.back().second++;
      else runs.push_back({g, 1});
    }
  }
}

// cowPrearm(h) -> { grains, ms }: while the VM still runs, write-protect the
// grains written so far again (they stay dirty: this checkpoint carries them),
// one run at a time so the fault handler is never held up for long. The pause
// then re-protects only what is written between this and `stop`.
Napi::Value CowPrearm(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  Cow *c = Get(info);
  uint64_t t0 = NowNs();
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  {
    std::lock_guard<std::mutex> l(c->mu);
    BitRuns(c->unprot, runs);
  }
  uint64_t grains = 0;
  // At most 8 MiB per ioctl under the lock: a writer's fault waits for one chunk at most.
  const uint64_t chunk = std::max<uint64_t>(1, (8u << 20) / c->grain);
  for (auto &r : runs) {
    for (uint64_t first = r.first; first < r.first + r.second; first += chunk) {
      uint64_t n = std::min(chunk, r.first + r.second - first);
      std::lock_guard<std::mutex> l(c->mu);
      // Only the pause and this protect grains, so every grain of the run is still un-protected.
      int e = c->Protect(c->start + first * c->grain, n * c->grain, true);
      if (e) ThrowErrno(env, "ioctl(UFFDIO_WRITEPROTECT) pre-arming dirty grains", e);
      for (uint64_t g = first; g < first + n; g++) Cow::Clear(c->unprot, g);
      grains += n;
    }
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("grains", Napi::Number::New(env, (double)grains));
  r.Set("ms", Napi::Number::New(env, (double)(NowNs() - t0) / 1e6));
  return r;
}

// cowCollect(h) -> { runs: Float64Array, grains, bytes, protectMs, reprotectedGrains, faults, cowCopies, spills, serviceMeanUs, serviceMaxUs }
// In the pause: the dirty grains become pending (slots in ascending order) and
// are write-protected again; the copier starts on them.
Napi::Value CowCollect(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  Cow *c = Get(info);
  std::unique_lock<std::mutex> l(c->mu);
  if (c->copied < c->n && !c->failed) ThrowErrno(env, "cowCollect: the previous checkpoint's copy is still in progress", EBUSY);
  if (c->wpErrno) {
    int e = c->wpErrno;
    c->wpErrno = 0;
    ThrowErrno(env, "UFFDIO_WRITEPROTECT in the fault handler", e);
  }
  uint64_t t0 = NowNs();
  c->order.clear();
  std::vector<double> runs;
  int err = 0;
  for (uint64_t w = 0; w < c->dirty.size(); w++) {
    uint64_t bits = c->dirty[w];
    while (bits) {
      uint64_t g = w * 64 + (uint64_t)__builtin_ctzll(bits);
      bits &= bits - 1;
      c->slotOf[g] = (uint32_t)c->order.size();
      c->order.push_back((uint32_t)g);
      double off = (double)(g * c->grain);
      size_t k = runs.size();
      if (k >= 2 && runs[k - 2] + runs[k - 1] == off) runs[k - 1] += (double)c->grain;
      else { runs.push_back(off); runs.push_back((double)c->grain); }
    }
    c->pending[w] = c->dirty[w];
    c->dirty[w] = 0;
  }
  // Every pending grain must be protected: those the handler let a write through since the
  // pre-arm (or since the last pause) are protected again now; the others still are.
  std::vector<std::pair<uint64_t, uint64_t>> open;
  BitRuns(c->unprot, open);
  uint64_t reprotected = 0;
  for (size_t i = 0; i < open.size() && !err; i++) {
    err = c->Protect(c->start + open[i].first * c->grain, open[i].second * c->grain, true);
    if (!err) {
      for (uint64_t g = open[i].first; g < open[i].first + open[i].second; g++) Cow::Clear(c->unprot, g);
      reprotected += open[i].second;
    }
  }
  if (err) {
    // Nothing is pending: the caller fails this checkpoint; the grains stay dirty for the next one.
    for (uint32_t g : c->order) { Cow::Clear(c->pending, g); Cow::Set(c->dirty, g); }
    c->order.clear();
    c->n = c->copied = c->released = 0;
    ThrowErrno(env, "ioctl(UFFDIO_WRITEPROTECT) re-arming dirty grains", err);
  }
  c->n = c->order.size();
  c->copied = c->released = 0;
  c->go = false;
  c->failed = false;
  c->failReason.clear();
  Napi::Object r = Napi::Object::New(env);
  Napi::Float64Array a = Napi::Float64Array::New(env, runs.size());
  if (!runs.empty()) memcpy(a.Data(), runs.data(), runs.size() * sizeof(double));
  r.Set("runs", a);
  r.Set("grains", Napi::Number::New(env, (double)c->n));
  r.Set("bytes", Napi::Number::New(env, (double)(c->n * c->grain)));
  r.Set("protectMs", Napi::Number::New(env, (double)(NowNs() - t0) / 1e6));
  r.Set("reprotectedGrains", Napi::Number::New(env, (double)reprotected));
  r.Set("faults", Napi::Number::New(env, (double)c->faults));
  r.Set("cowCopies", Napi::Number::New(env, (double)c->cowCopies));
  r.Set("spills", Napi::Number::New(env, (double)c->spills));
  r.Set("serviceMeanUs", Napi::Number::New(env, c->faults ? (double)c->serviceNsTotal / c->faults / 1e3 : 0));
  r.Set("serviceMaxUs", Napi::Number::New(env, (double)c->serviceNsMax / 1e3));
  c->faults = c->cowCopies = c->spills = c->serviceNsTotal = c->serviceNsMax = 0;
  c->cv.notify_all();
  return r;
}

// cowWaitBatch(h, maxBytes, timeoutMs) -> Promise<{ stagingOffset, bytes, grains, runs, done, failed, reason }>
// Waits (threadpool) until the copier has copied the next maxBytes of slots
// (or all, or the checkpoint failed, or the timeout passed) and describes them:
// slots [released, released+grains) lie contiguously at stagingOffset.
class WaitBatchWorker : public Napi::AsyncWorker {
 public:
  WaitBatchWorker(Napi::Env env, Cow *c, uint64_t maxBytes, int timeoutMs)
      : Napi::AsyncWorker(env), d_(Napi::Promise::Deferred::New(env)), c_(c), maxBytes_(maxBytes), timeoutMs_(timeoutMs) {}
  Napi::Promise Promise() { return d_.Promise(); }
  void Execute() override {
    Cow *c = c_;
    std::unique_lock<std::mutex> l(c->mu);
    uint64_t maxGrains = maxBytes_ / c->grain;
    if (maxGrains == 0) maxGrains = 1;
    uint64_t ringLeft = c->slots - (c->released % c->slots);
    if (maxGrains > ringLeft) maxGrains = ringLeft;
    auto ready = [&] { return c->stopping || c->failed || c->copied >= c->n || c->copied - c->released >= maxGrains; };
    c->cv.wait_for(l, std::chrono::milliseconds(timeoutMs_), ready);
    failed_ = c->failed || c->stopping;
    reason_ = c->failReason;
    if (failed_) return;
    uint64_t count = c->copied - c->released;
    if (count > maxGrains) count = maxGrains;
    offset_ = (c->released % c->slots) * c->grain;
    grains_ = count;
    for (uint64_t k = c->released; k < c->released + count; k++) {
      double off = (double)((uint64_t)c->order[k] * c->grain);
      size_t m = runs_.size();
      if (m >= 2 && runs_[m - 2] + runs_[m - 1] == off) runs_[m - 1] += (double)c->grain;
      else { runs_.push_back(off); runs_.push_back((double)c->grain); }
    }
    done_ = c->released + count >= c->n;
  }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::Object r = Napi::Object::New(env);
    Napi::Float64Array a = Napi::Float64Array::New(env, runs_.size());
    if (!runs_.empty()) memcpy(a.Data(), runs_.data(), runs_.size() * sizeof(double));
    r.Set("runs", a);
    r.Set("stagingOffset", Napi::Number::New(env, (double)offset_));
    r.Set("grains", Napi::Number::New(env, (double)grains_));
    r.Set("bytes", Napi::Number::New(env, (double)(grains_ * c_->grain)));
    r.Set("done", Napi::Boolean::New(env, done_));
    r.Set("failed", Napi::Boolean::New(env, failed_));
    r.Set("reason", Napi::String::New(env, reason_));
    d_.Resolve(r);
  }
  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred d_;
  Cow *c_;
  uint64_t maxBytes_;
  int timeoutMs_;
  std::vector<double> runs_;
  uint64_t offset_ = 0, grains_ = 0;
  bool done_ = false, failed_ = false;
  std::string reason_;
};

Napi::Value CowWaitBatch(const Napi::CallbackInfo &info) {
  Cow *c = Get(info);
  uint64_t maxBytes = ArgU64(info, 1, "maxBytes");
  uint64_t t = ArgU64(info, 2, "timeoutMs");
  auto *w = new WaitBatchWorker(info.Env(), c, maxBytes, t > INT32_MAX ? INT32_MAX : (int)t);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// cowSetStaging(h, staging: Buffer): a bigger ring, between checkpoints (no copy in progress).
// JS keeps the Buffer alive.
Napi::Value CowSetStaging(const Napi::CallbackInfo &info) {
  Cow *c = Get(info);
  Napi::Buffer<uint8_t> b = ArgBuffer(info, 1, "staging");
  if (b.Length() < c->grain) ThrowType(info.Env(), "staging buffer smaller than one grain");
  std::lock_guard<std::mutex> l(c->mu);
  if ((c->copied < c->n || c->released < c->n) && !c->failed) ThrowErrno(info.Env(), "cowSetStaging: a checkpoint copy is in progress", EBUSY);
  c->staging = b.Data();
  c->slots = b.Length() / c->grain;
  return info.Env().Undefined();
}

// cowStartCopy(h): the VM runs again: the copier may start on the pending grains.
Napi::Value CowStartCopy(const Napi::CallbackInfo &info) {
  Cow *c = Get(info);
  std::lock_guard<std::mutex> l(c->mu);
  c->go = true;
  c->cv.notify_all();
  return info.Env().Undefined();
}

// cowRelease(h, grains): the first `grains` copied slots were sent; their slots may be reused.
Napi::Value CowRelease(const Napi::CallbackInfo &info) {
  Cow *c = Get(info);
  uint64_t g = ArgU64(info, 1, "grains");
  std::lock_guard<std::mutex> l(c->mu);
  if (c->released + g > c->copied && !c->failed) ThrowType(info.Env(), "cowRelease: more grains than were copied");
  c->released += g;
  c->cv.notify_all();
  return info.Env().Undefined();
}

// cowFail(h, reason): give up the checkpoint in progress (its grains go into the next one).
Napi::Value CowFail(const Napi::CallbackInfo &info) {
  Cow *c = Get(info);
  std::string why = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "cancelled";
  std::lock_guard<std::mutex> l(c->mu);
  if (c->copied < c->n || c->released < c->n) c->FailLocked(why);
  return info.Env().Undefined();
}

// cowStats(h) -> { totalFaults, failures, pendingLeft, copied, released, grains, grain, slots }
Napi::Value CowStats(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  Cow *c = Get(info);
  std::lock_guard<std::mutex> l(c->mu);
  Napi::Object r = Napi::Object::New(env);
  r.Set("totalFaults", Napi::Number::New(env, (double)c->totalFaults));
  r.Set("failures", Napi::Number::New(env, (double)c->failures));
  r.Set("pendingGrains", Napi::Number::New(env, (double)(c->failed ? 0 : c->n - c->copied)));
  r.Set("copied", Napi::Number::New(env, (double)c->copied));
  r.Set("released", Napi::Number::New(env, (double)c->released));
  r.Set("grains", Napi::Number::New(env, (double)c->n));
  r.Set("grain", Napi::Number::New(env, (double)c->grain));
  r.Set("slots", Napi::Number::New(env, (double)c->slots));
  return r;
}

// cowStop(h): fail what is pending, un-protect and unregister all RAM (waking
// every writer), stop both threads. Idempotent.
Napi::Value CowStop(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) ThrowType(info.Env(), "CoW session handle expected");
  info[0].As<Napi::External<Cow>>().Data()->Stop();
  return info.Env().Undefined();
}

}  // namespace

void InitCow(Napi::Env env, Napi::Object exports) {
  exports.Set("cowStart", Napi::Function::New(env, CowStart));
  exports.Set("cowArmAll", Napi::Function::New(env, CowArmAll));
  exports.Set("cowPrearm", Napi::Function::New(env, CowPrearm));
  exports.Set("cowCollect", Napi::Function::New(env, CowCollect));
  exports.Set("cowWaitBatch", Napi::Function::New(env, CowWaitBatch));
  exports.Set("cowStartCopy", Napi::Function::New(env, CowStartCopy));
  exports.Set("cowSetStaging", Napi::Function::New(env, CowSetStaging));
  exports.Set("cowRelease", Napi::Function::New(env, CowRelease));
  exports.Set("cowFail", Napi::Function::New(env, CowFail));
  exports.Set("cowStats", Napi::Function::New(env, CowStats));
  exports.Set("cowStop", Napi::Function::New(env, CowStop));
}

}  // namespace hydra
