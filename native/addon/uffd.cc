// pidfd, userfaultfd and PAGEMAP_SCAN. Thin wrappers: each function is one
// kernel operation (or the loop the kernel's contract requires), the policy
// (which uffd to take, which features to insist on) lives in TypeScript.
#include "common.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

#include <vector>

// Newer than the machine's libc/kernel headers (6.1): values from Linux 6.7+.
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

namespace hydra {
namespace {

// linux/fs.h (6.7+), renamed so a newer header cannot clash.
struct PageRegion { uint64_t start, end, categories; };
struct PmScanArg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages,
      category_inverted, category_mask, category_anyof_mask, return_mask;
};
static_assert(sizeof(PmScanArg) == 96, "pm_scan_arg layout");
static_assert(sizeof(PageRegion) == 24, "page_region layout");
constexpr uint64_t kPageIsWpallowed = 1 << 0;
constexpr uint64_t kPageIsWritten = 1 << 1;
constexpr uint64_t kPageIsFile = 1 << 2;
constexpr uint64_t kPageIsPresent = 1 << 3;
constexpr uint64_t kPageIsSwapped = 1 << 4;
constexpr uint64_t kPageIsPfnzero = 1 << 5;
constexpr uint64_t kPmScanWpMatching = 1 << 0;
constexpr uint64_t kPmScanCheckWpasync = 1 << 1;
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);

Napi::Value PidfdOpen(const Napi::CallbackInfo &info) {
  uint64_t pid = ArgU64(info, 0, "pid");
  int fd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
  if (fd < 0) ThrowErrno(info.Env(), "pidfd_open", errno);
  return Napi::Number::New(info.Env(), fd);
}

// pidfd_send_signal: signals exactly the process the pidfd was opened on, or
// fails with ESRCH once it has exited, even if its PID has been reused since.
Napi::Value PidfdSendSignal(const Napi::CallbackInfo &info) {
  int pidfd = ArgFd(info, 0, "pidfd");
  uint64_t sig = ArgU64(info, 1, "signal");
  if (syscall(SYS_pidfd_send_signal, pidfd, (int)sig, nullptr, 0) != 0) ThrowErrno(info.Env(), "pidfd_send_signal", errno);
  return info.Env().Undefined();
}

Napi::Value PidfdGetfd(const Napi::CallbackInfo &info) {
  int pidfd = ArgFd(info, 0, "pidfd");
  int target = ArgFd(info, 1, "targetFd");
  int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
  if (fd < 0) ThrowErrno(info.Env(), "pidfd_getfd", errno);
  return Napi::Number::New(info.Env(), fd);
}

// UFFDIO_API on a fresh uffd. Returns the features the kernel granted and the
// ioctls it offers. A uffd accepts UFFDIO_API exactly once (EINVAL after).
Napi::Value UffdApi(const Napi::CallbackInfo &info) {
  int uffd = ArgFd(info, 0, "uffd");
  uint64_t features = ArgU64(info, 1, "features");
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = features;
  if (ioctl(uffd, UFFDIO_API, &api) != 0) ThrowErrno(info.Env(), "ioctl(UFFDIO_API)", errno);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("features", Napi::Number::New(info.Env(), (double)api.features));
  r.Set("ioctls", Napi::Number::New(info.Env(), (double)api.ioctls));
  return r;
}

// The features this kernel can offer, asked of a throw-away uffd of our own
// (asking on the target's uffd would consume its one UFFDIO_API).
Napi::Value ProbeUffdFeatures(const Napi::CallbackInfo &info) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0 && errno == EPERM) fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  if (fd < 0) ThrowErrno(info.Env(), "userfaultfd", errno);
  struct uffdio_api api = {};
  api.api = UFFD_API;
  int rc = ioctl(fd, UFFDIO_API, &api);
  int err = errno;
  close(fd);
  if (rc != 0) ThrowErrno(info.Env(), "ioctl(UFFDIO_API)", err);
  return Napi::Number::New(info.Env(), (double)api.features);
}

Napi::Value UffdRegister(const Napi::CallbackInfo &info) {
  int uffd = ArgFd(info, 0, "uffd");
  struct uffdio_register reg = {};
  reg.range.start = ArgU64(info, 1, "start");
  reg.range.len = ArgU64(info, 2, "len");
  reg.mode = ArgU64(info, 3, "mode");
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) ThrowErrno(info.Env(), "ioctl(UFFDIO_REGISTER)", errno);
  return Napi::Number::New(info.Env(), (double)reg.ioctls);
}

Napi::Value UffdUnregister(const Napi::CallbackInfo &info) {
  int uffd = ArgFd(info, 0, "uffd");
  struct uffdio_range range = {};
  range.start = ArgU64(info, 1, "start");
  range.len = ArgU64(info, 2, "len");
  if (ioctl(uffd, UFFDIO_UNREGISTER, &range) != 0) ThrowErrno(info.Env(), "ioctl(UFFDIO_UNREGISTER)", errno);
  return info.Env().Undefined();
}

Napi::Value UffdWriteProtect(const Napi::CallbackInfo &info) {
  int uffd = ArgFd(info, 0, "uffd");
  struct uffdio_writeprotect wp = {};
  wp.range.start = ArgU64(info, 1, "start");
  wp.range.len = ArgU64(info, 2, "len");
  bool on = info.Length() > 3 ? info[3].ToBoolean().Value() : true;
  wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
  for (;;) {
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0) break;
    if (errno == EAGAIN || errno == EINTR) continue;  // mmap_changing: retry
    ThrowErrno(info.Env(), "ioctl(UFFDIO_WRITEPROTECT)", errno);
  }
  return info.Env().Undefined();
}

Napi::Value UffdWake(const Napi::CallbackInfo &info) {
  int uffd = ArgFd(info, 0, "uffd");
  struct uffdio_range range = {};
  range.start = ArgU64(info, 1, "start");
  range.len = ArgU64(info, 2, "len");
  if (ioctl(uffd, UFFDIO_WAKE, &range) != 0) ThrowErrno(info.Env(), "ioctl(UFFDIO_WAKE)", errno);
  return info.Env().Undefined();
}

// The PAGEMAP_SCAN loop shared by scanWritten and scanPages: calls the ioctl
// from `start` until walk_end reaches `end` (the kernel may stop early even
// with room left in the vector) and returns [offset, length] pairs relative to
// start, ascending, adjacent runs merged (also across calls).
struct ScanSpec {
  uint64_t flags, inverted, mask, anyof, ret;
};

// Scans [s, e) (absolute, page aligned) with `spec`, appending [offset, length]
// pairs relative to `base` to out (merged with its last run where they touch).
void ScanRange(Napi::Env env, int fd, const ScanSpec &spec, std::vector<PageRegion> &vec, uint64_t s0, uint64_t end, uint64_t base,
               std::vector<double> &out, uint64_t &calls, uint64_t &pages) {
  uint64_t cur = s0, stalls = 0;
  while (cur < end) {
    PmScanArg arg = {};
    arg.size = sizeof arg;
    arg.flags = spec.flags;
    arg.start = cur;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec.data();
    arg.vec_len = vec.size();
    arg.category_inverted = spec.inverted;
    arg.category_mask = spec.mask;
    arg.category_anyof_mask = spec.anyof;
    arg.return_mask = spec.ret;
    long n = ioctl(fd, kPagemapScan, &arg);
    calls++;
    if (n < 0) {
      if (errno == EINTR) continue;
      ThrowErrno(env, "ioctl(PAGEMAP_SCAN)", errno);
    }
    for (long i = 0; i < n; i++) {
      uint64_t s = vec[i].start, e = vec[i].end;
      if (s < s0 || e > end || e <= s) ThrowErrno(env, "PAGEMAP_SCAN returned a region outside the range", EIO);
      pages += (e - s) / PageSize();
      double off = (double)(s - base), len = (double)(e - s);
      size_t k = out.size();
      if (k >= 2 && out[k - 2] + out[k - 1] == off) out[k - 1] += len;
      else { out.push_back(off); out.push_back(len); }
    }
    uint64_t next = arg.walk_end;
    if (next <= cur) {
      // No progress. Never seen; bounded so a kernel surprise cannot spin forever.
      if (++stalls > 1000) ThrowErrno(env, "PAGEMAP_SCAN made no progress", EIO);
      continue;
    }
    stalls = 0;
    cur = next;
  }
}

Napi::Value ScanResultOf(Napi::Env env, const std::vector<double> &out, uint64_t calls, uint64_t pages) {
  Napi::Float64Array runs = Napi::Float64Array::New(env, out.size());
  if (!out.empty()) memcpy(runs.Data(), out.data(), out.size() * sizeof(double));
  Napi::Object r = Napi::Object::New(env);
  r.Set("runs", runs);
  r.Set("calls", Napi::Number::New(env, (double)calls));
  r.Set("pages", Napi::Number::New(env, (double)pages));
  return r;
}

Napi::Value ScanLoop(const Napi::CallbackInfo &info, const ScanSpec &spec, uint64_t vecLen) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "pagemapFd");
  uint64_t start = ArgU64(info, 1, "start");
  uint64_t end = ArgU64(info, 2, "end");
  if (vecLen == 0 || vecLen > (1u << 20)) ThrowType(env, "vecLen out of range");
  if (end < start || (start | end) & (PageSize() - 1)) ThrowType(env, "start/end must be page aligned, start <= end");
  std::vector<PageRegion> vec(vecLen);
  std::vector<double> out;
  uint64_t calls = 0, pages = 0;
  ScanRange(env, fd, spec, vec, start, end, start, out, calls, pages);
  return ScanResultOf(env, out, calls, pages);
}

// The same over several [offset, length] ranges relative to `start` (ascending,
// not overlapping): only they are walked. Runs are relative to start.
Napi::Value ScanLoopIn(const Napi::CallbackInfo &info, const ScanSpec &spec, uint64_t vecLen) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "pagemapFd");
  uint64_t start = ArgU64(info, 1, "start");
  if (info.Length() < 3 || !info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    ThrowType(env, "ranges must be a Float64Array of [offset, length] pairs");
  Napi::Float64Array rs = info[2].As<Napi::Float64Array>();
  if (rs.ElementLength() % 2) ThrowType(env, "ranges must hold [offset, length] pairs");
  if (vecLen == 0 || vecLen > (1u << 20)) ThrowType(env, "vecLen out of range");
  if (start & (PageSize() - 1)) ThrowType(env, "start must be page aligned");
  std::vector<PageRegion> vec(vecLen);
  std::vector<double> out;
  uint64_t calls = 0, pages = 0, last = 0;
  for (size_t i = 0; i < rs.ElementLength(); i += 2) {
    double o = rs[i], l = rs[i + 1];
    if (!(o >= 0) || !(l > 0) || o != (double)(uint64_t)o || l != (double)(uint64_t)l) ThrowType(env, "ranges must be non-negative integers");
    uint64_t s = (uint64_t)o, e = s + (uint64_t)l;
    if ((s | e) & (PageSize() - 1)) ThrowType(env, "ranges must be page aligned");
    if (s < last) ThrowType(env, "ranges must be ascending and not overlap");
    last = e;
    ScanRange(env, fd, spec, vec, start + s, start + e, start, out, calls, pages);
  }
  return ScanResultOf(env, out, calls, pages);
}

// scanWritten(pagemapFd, start, end, vecLen?) -> { runs: Float64Array, calls, pages }
// PAGEMAP_SCAN returning the pages written since they were last protected and
// re-protecting them in the same walk (WP_MATCHING | CHECK_WPASYNC,
// PAGE_IS_WRITTEN), looped until walk_end == end.
Napi::Value ScanWritten(const Napi::CallbackInfo &info) {
  uint64_t vecLen = info.Length() > 3 && !info[3].IsUndefined() ? ArgU64(info, 3, "vecLen") : 4096;
  return ScanLoop(info, {kPmScanWpMatching | kPmScanCheckWpasync, 0, kPageIsWritten, 0, kPageIsWritten}, vecLen);
}

// scanPages(pagemapFd, start, end, { flags?, categoryInverted?, categoryMask?,
//           categoryAnyofMask?, returnMask }, vecLen?) -> { runs, calls, pages }
// The general PAGEMAP_SCAN (same loop and result as scanWritten). A page
// matches when ((categories ^ inverted) & mask) == mask and, if anyof is
// non-zero, (categories ^ inverted) & anyof != 0. Without PM_SCAN_WP_MATCHING
// in flags nothing is re-protected.
Napi::Value ScanPages(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[3].IsObject()) ThrowType(env, "scan spec must be an object");
  Napi::Object o = info[3].As<Napi::Object>();
  auto field = [&](const char *k) -> uint64_t {
    Napi::Value v = o.Get(k);
    if (v.IsUndefined()) return 0;
    if (!v.IsNumber()) ThrowType(env, std::string(k) + " must be a number");
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 9007199254740991.0 || d != (double)(uint64_t)d) ThrowType(env, std::string(k) + " must be a non-negative integer");
    return (uint64_t)d;
  };
  ScanSpec spec = {field("flags"), field("categoryInverted"), field("categoryMask"), field("categoryAnyofMask"), field("returnMask")};
  if (spec.ret == 0) ThrowType(env, "returnMask must not be 0");
  uint64_t vecLen = info.Length() > 4 && !info[4].IsUndefined() ? ArgU64(info, 4, "vecLen") : 4096;
  return ScanLoop(info, spec, vecLen);
}

// scanWrittenIn(pagemapFd, start, ranges: Float64Array, vecLen?) -> { runs, calls, pages }
// scanWritten over the given ranges only (relative to start).
Napi::Value ScanWrittenIn(const Napi::CallbackInfo &info) {
  uint64_t vecLen = info.Length() > 3 && !info[3].IsUndefined() ? ArgU64(info, 3, "vecLen") : 4096;
  return ScanLoopIn(info, {kPmScanWpMatching | kPmScanCheckWpasync, 0, kPageIsWritten, 0, kPageIsWritten}, vecLen);
}

// countWrittenIn(pagemapFd, start, ranges: Float64Array) -> { runs, calls, pages }
// Pages written in the ranges, nothing re-protected (sizing the next copy while the VM runs).
Napi::Value CountWrittenIn(const Napi::CallbackInfo &info) {
  return ScanLoopIn(info, {0, 0, kPageIsWritten, 0, kPageIsWritten}, 4096);
}

// copyIn(uffd, dst, src: Buffer, srcOffset, len) -> { copied, existed }
// UFFDIO_COPY of src[srcOffset, +len) to the target's address dst (page
// aligned, len a multiple of the page size). Pages already present (EEXIST)
// are skipped and counted in `existed`; then the whole range is woken so no
// thread stays parked on them. EAGAIN (partial copy, or the mm changing) is
// retried from where it stopped.
Napi::Value UffdCopy(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int uffd = ArgFd(info, 0, "uffd");
  uint64_t dst = ArgU64(info, 1, "dst");
  Napi::Buffer<uint8_t> src = ArgBuffer(info, 2, "src");
  uint64_t srcOff = ArgU64(info, 3, "srcOffset");
  uint64_t len = ArgU64(info, 4, "len");
  const uint64_t ps = PageSize();
  if ((dst | len) & (ps - 1) || len == 0) ThrowType(env, "dst and len must be page aligned, len > 0");
  if (srcOff > src.Length() || len > src.Length() - srcOff) ThrowType(env, "src range out of bounds");
  const uint8_t *base = src.Data() + srcOff;

  uint64_t done = 0, copied = 0, existed = 0, retries = 0;
  while (done < len) {
    struct uffdio_copy c = {};
    c.dst = dst + done;
    c.src = (uint64_t)(uintptr_t)(base + done);
    c.len = len - done;
    c.mode = 0;
    c.copy = 0;
    int rc = ioctl(uffd, UFFDIO_COPY, &c);
    int err = errno;
    if (c.copy > 0) { done += (uint64_t)c.copy; copied += (uint64_t)c.copy; }
    if (rc == 0) break;
    int cerr = c.copy < 0 ? (int)-c.copy : err;
    if (cerr == EEXIST) { done += ps; existed += ps; continue; }
    if (cerr == EAGAIN || err == EINTR) {
      if (c.copy <= 0 && ++retries > 100000) ThrowErrno(env, "ioctl(UFFDIO_COPY) kept failing", EAGAIN);
      continue;
    }
    ThrowErrno(env, "ioctl(UFFDIO_COPY)", cerr);
  }
  if (existed) {
    struct uffdio_range range = {dst, len};
    if (ioctl(uffd, UFFDIO_WAKE, &range) != 0) ThrowErrno(env, "ioctl(UFFDIO_WAKE)", errno);
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("copied", Napi::Number::New(env, (double)copied));
  r.Set("existed", Napi::Number::New(env, (double)existed));
  return r;
}

// waitFaults(uffd, cancelFd, pidfd, timeoutMs) -> Promise<{ addresses: Float64Array, cancelled, exited, timedOut, otherEvents }>
// poll()s in the libuv threadpool on the uffd, an eventfd to cancel the wait
// (-1: none) and a pidfd (-1: none; readable once the process exited), then
// reads every pending uffd_msg. addresses are the faulting addresses rounded
// down to the page (duplicates kept, in arrival order).
class WaitFaultsWorker : public Napi::AsyncWorker {
 public:
  WaitFaultsWorker(Napi::Env env, int uffd, int cancelFd, int pidfd, int timeoutMs)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)),
        uffd_(uffd), cancelFd_(cancelFd), pidfd_(pidfd), timeoutMs_(timeoutMs) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    struct pollfd p[3] = {{uffd_, POLLIN, 0}, {cancelFd_, POLLIN, 0}, {pidfd_, POLLIN, 0}};
    int n;
    do n = poll(p, 3, timeoutMs_); while (n < 0 && errno == EINTR);
    if (n < 0) { fail("poll(userfaultfd)", errno); return; }
    if (n == 0) { timedOut_ = true; return; }
    if (p[1].revents & POLLIN) cancelled_ = true;
    if (p[2].revents & POLLIN) exited_ = true;
    if (p[0].revents & POLLNVAL) { fail("poll(userfaultfd)", EBADF); return; }
    if (p[0].revents & POLLERR) { fail("poll(userfaultfd): not initialised (UFFDIO_API not done)", EINVAL); return; }
    if (!(p[0].revents & POLLIN)) return;
    const uint64_t mask = ~(PageSize() - 1);
    struct uffd_msg msgs[64];
    for (;;) {
      ssize_t r = read(uffd_, msgs, sizeof msgs);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        fail("read(userfaultfd)", errno);
        return;
      }
      size_t k = (size_t)r / sizeof(struct uffd_msg);
      for (size_t i = 0; i < k; i++) {
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT) addresses_.push_back((double)(msgs[i].arg.pagefault.address & mask));
        else otherEvents_++;
      }
      // The fd may be blocking: only read again if more is pending.
      struct pollfd q = {uffd_, POLLIN, 0};
      if (poll(&q, 1, 0) <= 0 || !(q.revents & POLLIN)) break;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_) {
      deferred_.Reject(ErrnoError(env, syscall_, err_).Value());
      return;
    }
    Napi::Float64Array a = Napi::Float64Array::New(env, addresses_.size());
    if (!addresses_.empty()) memcpy(a.Data(), addresses_.data(), addresses_.size() * sizeof(double));
    Napi::Object r = Napi::Object::New(env);
    r.Set("addresses", a);
    r.Set("cancelled", Napi::Boolean::New(env, cancelled_));
    r.Set("exited", Napi::Boolean::New(env, exited_));
    r.Set("timedOut", Napi::Boolean::New(env, timedOut_));
    r.Set("otherEvents", Napi::Number::New(env, otherEvents_));
    deferred_.Resolve(r);
  }
  void OnError(const Napi::Error &e) override { deferred_.Reject(e.Value()); }

 private:
  void fail(const char *sc, int e) { syscall_ = sc; err_ = e; }
  Napi::Promise::Deferred deferred_;
  int uffd_, cancelFd_, pidfd_, timeoutMs_;
  std::vector<double> addresses_;
  bool cancelled_ = false, exited_ = false, timedOut_ = false;
  double otherEvents_ = 0;
  const char *syscall_ = "";
  int err_ = 0;
};

Napi::Value WaitFaults(const Napi::CallbackInfo &info) {
  int uffd = ArgFd(info, 0, "uffd");
  int cancelFd = info[1].IsNumber() && info[1].As<Napi::Number>().Int32Value() >= 0 ? ArgFd(info, 1, "cancelFd") : -1;
  int pidfd = info[2].IsNumber() && info[2].As<Napi::Number>().Int32Value() >= 0 ? ArgFd(info, 2, "pidfd") : -1;
  double t = info[3].IsNumber() ? info[3].As<Napi::Number>().DoubleValue() : -1;
  int timeoutMs = t < 0 ? -1 : t > INT32_MAX ? INT32_MAX : (int)t;
  auto *w = new WaitFaultsWorker(info.Env(), uffd, cancelFd, pidfd, timeoutMs);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value EventfdCreate(const Napi::CallbackInfo &info) {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) ThrowErrno(info.Env(), "eventfd", errno);
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value EventfdSignal(const Napi::CallbackInfo &info) {
  int fd = ArgFd(info, 0, "eventfd");
  uint64_t one = 1;
  if (write(fd, &one, sizeof one) != sizeof one && errno != EAGAIN) ThrowErrno(info.Env(), "write(eventfd)", errno);
  return info.Env().Undefined();
}

Napi::Value Close(const Napi::CallbackInfo &info) {
  int fd = ArgFd(info, 0, "fd");
  if (close(fd) != 0 && errno != EINTR) ThrowErrno(info.Env(), "close", errno);
  return info.Env().Undefined();
}

Napi::Value SetNonblock(const Napi::CallbackInfo &info) {
  int fd = ArgFd(info, 0, "fd");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) ThrowErrno(info.Env(), "fcntl(F_SETFL, O_NONBLOCK)", errno);
  return info.Env().Undefined();
}

}  // namespace

void InitUffd(Napi::Env env, Napi::Object exports) {
  exports.Set("pidfdOpen", Napi::Function::New(env, PidfdOpen));
  exports.Set("pidfdGetfd", Napi::Function::New(env, PidfdGetfd));
  exports.Set("pidfdSendSignal", Napi::Function::New(env, PidfdSendSignal));
  exports.Set("uffdApi", Napi::Function::New(env, UffdApi));
  exports.Set("probeUffdFeatures", Napi::Function::New(env, ProbeUffdFeatures));
  exports.Set("uffdRegister", Napi::Function::New(env, UffdRegister));
  exports.Set("uffdUnregister", Napi::Function::New(env, UffdUnregister));
  exports.Set("uffdWriteProtect", Napi::Function::New(env, UffdWriteProtect));
  exports.Set("uffdWake", Napi::Function::New(env, UffdWake));
  exports.Set("uffdCopy", Napi::Function::New(env, UffdCopy));
  exports.Set("scanWritten", Napi::Function::New(env, ScanWritten));
  exports.Set("scanPages", Napi::Function::New(env, ScanPages));
  exports.Set("scanWrittenIn", Napi::Function::New(env, ScanWrittenIn));
  exports.Set("countWrittenIn", Napi::Function::New(env, CountWrittenIn));
  exports.Set("waitFaults", Napi::Function::New(env, WaitFaults));
  exports.Set("eventfdCreate", Napi::Function::New(env, EventfdCreate));
  exports.Set("eventfdSignal", Napi::Function::New(env, EventfdSignal));
  exports.Set("close", Napi::Function::New(env, Close));
  exports.Set("setNonblock", Napi::Function::New(env, SetNonblock));

  Napi::Object c = Napi::Object::New(env);
  c.Set("UFFD_FEATURE_WP_HUGETLBFS_SHMEM", Napi::Number::New(env, UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
  c.Set("UFFD_FEATURE_WP_UNPOPULATED", Napi::Number::New(env, UFFD_FEATURE_WP_UNPOPULATED));
  c.Set("UFFD_FEATURE_WP_ASYNC", Napi::Number::New(env, UFFD_FEATURE_WP_ASYNC));
  c.Set("UFFDIO_REGISTER_MODE_MISSING", Napi::Number::New(env, (double)UFFDIO_REGISTER_MODE_MISSING));
  c.Set("UFFDIO_REGISTER_MODE_WP", Napi::Number::New(env, (double)UFFDIO_REGISTER_MODE_WP));
  c.Set("UFFDIO_COPY_IOCTL_BIT", Napi::Number::New(env, (double)_UFFDIO_COPY));
  c.Set("UFFDIO_WRITEPROTECT_IOCTL_BIT", Napi::Number::New(env, (double)_UFFDIO_WRITEPROTECT));
  c.Set("PAGE_IS_WPALLOWED", Napi::Number::New(env, (double)kPageIsWpallowed));
  c.Set("PAGE_IS_WRITTEN", Napi::Number::New(env, (double)kPageIsWritten));
  c.Set("PAGE_IS_FILE", Napi::Number::New(env, (double)kPageIsFile));
  c.Set("PAGE_IS_PRESENT", Napi::Number::New(env, (double)kPageIsPresent));
  c.Set("PAGE_IS_SWAPPED", Napi::Number::New(env, (double)kPageIsSwapped));
  c.Set("PAGE_IS_PFNZERO", Napi::Number::New(env, (double)kPageIsPfnzero));
  c.Set("PM_SCAN_WP_MATCHING", Napi::Number::New(env, (double)kPmScanWpMatching));
  c.Set("PM_SCAN_CHECK_WPASYNC", Napi::Number::New(env, (double)kPmScanCheckWpasync));
  exports.Set("constants", c);
}

}  // namespace hydra
