// mmap-backed Buffers and the batch copy of dirty runs.
//
// Buffers made here point at memory the addon mapped; their finalizer
// munmaps. releaseMapping() drops the underlying file/memory early without
// leaving a dangling Buffer: the range is replaced in place by an anonymous
// read-only mapping of zeros (reads give 0, nothing is held), and the
// finalizer later unmaps that.
#include <algorithm>
#include <thread>
#include <vector>
#include "common.h"

#include <limits.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <mutex>
#include <unordered_map>

namespace hydra {
namespace {

std::mutex g_lock;
std::unordered_map<uintptr_t, size_t> g_maps;  // address -> mapped length

void Track(void *p, size_t len) {
  std::lock_guard<std::mutex> l(g_lock);
  g_maps[(uintptr_t)p] = len;
}

void Unmap(Napi::Env, uint8_t *p) {
  size_t len = 0;
  {
    std::lock_guard<std::mutex> l(g_lock);
    auto it = g_maps.find((uintptr_t)p);
    if (it == g_maps.end()) return;
    len = it->second;
    g_maps.erase(it);
  }
  munmap(p, len);
}

uint64_t RoundUp(uint64_t v) { return (v + PageSize() - 1) & ~(PageSize() - 1); }

Napi::Buffer<uint8_t> Wrap(Napi::Env env, void *p, size_t len, size_t mapped) {
  Track(p, mapped);
  return Napi::Buffer<uint8_t>::New(env, (uint8_t *)p, len, Unmap);
}

// mmapFile(fd, len, offset, writable=false) -> Buffer over a MAP_SHARED mapping.
Napi::Value MmapFile(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  uint64_t len = ArgU64(info, 1, "len");
  uint64_t off = ArgU64(info, 2, "offset");
  bool writable = info.Length() > 3 && info[3].ToBoolean().Value();
  if (len == 0 || off & (PageSize() - 1)) ThrowType(env, "len must be > 0 and offset page aligned");
  size_t mapped = RoundUp(len);
  void *p = mmap(nullptr, mapped, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)off);
  if (p == MAP_FAILED) ThrowErrno(env, "mmap", errno);
  return Wrap(env, p, len, mapped);
}

// allocStaging(bytes) -> Buffer of private anonymous memory, pre-faulted with
// MAP_POPULATE so the first checkpoint pause does not take the page faults.
Napi::Value AllocStaging(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  uint64_t len = ArgU64(info, 0, "bytes");
  if (len == 0) ThrowType(env, "bytes must be > 0");
  size_t mapped = RoundUp(len);
  void *p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) ThrowErrno(env, "mmap(MAP_POPULATE)", errno);
  return Wrap(env, p, len, mapped);
}

// releaseMapping(buf) -> true if buf was an addon mapping and is now released.
Napi::Value ReleaseMapping(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> b = ArgBuffer(info, 0, "buffer");
  size_t len = 0;
  {
    std::lock_guard<std::mutex> l(g_lock);
    auto it = g_maps.find((uintptr_t)b.Data());
    if (it == g_maps.end()) return Napi::Boolean::New(env, false);
    len = it->second;
  }
  void *p = mmap(b.Data(), len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) ThrowErrno(env, "mmap(MAP_FIXED) to release a mapping", errno);
  return Napi::Boolean::New(env, true);
}

// Checks [offset, length] run pairs (non-negative integers, inside [0, limit)
// when haveLimit; `where` names that range in errors) and that dst holds their total from dstOff.
// Returns the total. Every bound is checked before the first byte moves.
uint64_t CheckRuns(Napi::Env env, const double *r, size_t n, bool haveLimit, uint64_t limit, const std::string &where,
                   const Napi::Buffer<uint8_t> &dst, uint64_t dstOff) {
  if (n % 2) ThrowType(env, "runs must hold [offset, length] pairs");
  uint64_t total = 0;
  for (size_t i = 0; i < n; i += 2) {
    double o = r[i], l = r[i + 1];
    if (!(o >= 0) || !(l >= 0) || o != (double)(uint64_t)o || l != (double)(uint64_t)l)
      ThrowType(env, "run offsets/lengths must be non-negative integers");
    if (haveLimit && ((uint64_t)o > limit || (uint64_t)l > limit - (uint64_t)o))
      ThrowType(env, "run [" + std::to_string((uint64_t)o) + ", +" + std::to_string((uint64_t)l) + ") is outside " + where);
    total += (uint64_t)l;
  }
  if (dstOff > dst.Length() || total > dst.Length() - dstOff)
    ThrowType(env, "dst too small: needs " + std::to_string(total) + " bytes from offset " + std::to_string(dstOff) +
                       ", has " + std::to_string(dst.Length()));
  return total;
}

// copyRuns(src, runs: Float64Array [offset, length]*, dst, dstOffset=0, maxThreads=4) -> bytes
// Copies each run of src, in order, contiguously into dst from dstOffset.
// All bounds are checked before the first byte moves.
Napi::Value CopyRuns(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> src = ArgBuffer(info, 0, "src");
  if (info.Length() < 2 || !info[1].IsTypedArray() ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    ThrowType(env, "runs must be a Float64Array of [offset, length] pairs");
  Napi::Float64Array runs = info[1].As<Napi::Float64Array>();
  Napi::Buffer<uint8_t> dst = ArgBuffer(info, 2, "dst");
  uint64_t dstOff = info.Length() > 3 && !info[3].IsUndefined() ? ArgU64(info, 3, "dstOffset") : 0;
  size_t n = runs.ElementLength();
  const double *r = runs.Data();
  uint64_t total = CheckRuns(env, r, n, true, src.Length(), "src", dst, dstOff);
  uint8_t *d = dst.Data() + dstOff;
  const uint8_t *s = src.Data();
  // Within a checkpoint's pause the vCPUs are stopped, so the copy may use every
  // core: one thread saturates well below the memory bandwidth here.
  unsigned threads = std::thread::hardware_concurrency();
  unsigned maxThreads = info.Length() > 4 && !info[4].IsUndefined() ? (unsigned)ArgU64(info, 4, "maxThreads") : 4;
  if (maxThreads < 1) maxThreads = 1;
  if (threads > maxThreads) threads = maxThreads;
  if (threads < 2 || total < (8u << 20)) {
    for (size_t i = 0; i < n; i += 2) {
      size_t o = (size_t)r[i], l = (size_t)r[i + 1];
      memcpy(d, s + o, l);
      d += l;
    }
    return Napi::Number::New(env, (double)total);
  }
  // Thread t copies bytes [t*total/T, (t+1)*total/T) of the destination.
  auto worker = [&](uint64_t from, uint64_t to) {
    uint64_t pos = 0;
    for (size_t i = 0; i < n && pos < to; i += 2) {
      uint64_t o = (uint64_t)r[i], l = (uint64_t)r[i + 1];
      uint64_t a = pos > from ? pos : from, b = pos + l < to ? pos + l : to;
      if (a < b) memcpy(d + a, s + o + (a - pos), b - a);
      pos += l;
    }
  };
  std::vector<std::thread> pool;
  uint64_t step = (total / threads + 4095) & ~(uint64_t)4095;
  for (unsigned t = 1; t < threads; t++) {
    uint64_t a = step * t, b = t + 1 == threads ? total : step * (t + 1);
    if (a < total) pool.emplace_back(worker, a, b < total ? b : total);
  }
  worker(0, step < total ? step : total);
  for (auto &th : pool) th.join();
  return Napi::Number::New(env, (double)total);
}

// processReadRuns(pid, base, runs: Float64Array [offset, length]*, dst,
//                 dstOffset=0, limit?) -> bytes
// Reads each run of another process's memory at base+offset, in order,
// contiguously into dst from dstOffset, with process_vm_readv in batches of up
// to IOV_MAX runs. For guest RAM that is a private mapping (its copy-on-write
// pages are only in the process's address space). With `limit`, every run must
// lie within [0, limit). All bounds are checked before the first byte moves.
// A partial read is continued from where it stopped; a read that makes no
// progress throws EFAULT naming the offset (ESRCH: the process is gone).
Napi::Value ProcessReadRuns(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  uint64_t pid = ArgU64(info, 0, "pid");
  if (pid == 0 || pid > INT32_MAX) ThrowType(env, "pid out of range");
  uint64_t base = ArgU64(info, 1, "base");
  if (info.Length() < 3 || !info[2].IsTypedArray() ||
      info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    ThrowType(env, "runs must be a Float64Array of [offset, length] pairs");
  Napi::Float64Array runs = info[2].As<Napi::Float64Array>();
  Napi::Buffer<uint8_t> dst = ArgBuffer(info, 3, "dst");
  uint64_t dstOff = info.Length() > 4 && !info[4].IsUndefined() ? ArgU64(info, 4, "dstOffset") : 0;
  bool haveLimit = info.Length() > 5 && !info[5].IsUndefined();
  uint64_t limit = haveLimit ? ArgU64(info, 5, "limit") : 0;
  size_t n = runs.ElementLength();
  const double *r = runs.Data();
  uint64_t total = CheckRuns(env, r, n, haveLimit, limit, "[0, " + std::to_string(limit) + ")", dst, dstOff);
  uint8_t *d = dst.Data() + dstOff;
  std::vector<struct iovec> remote;
  remote.reserve(IOV_MAX);
  size_t i = 0;       // current run (pair index)
  uint64_t skip = 0;  // bytes of run i already read
  uint64_t done = 0;
  while (i < n) {
    remote.clear();
    uint64_t want = 0;
    for (size_t j = i; j < n && remote.size() < IOV_MAX; j += 2) {
      uint64_t o = (uint64_t)r[j], l = (uint64_t)r[j + 1];
      uint64_t s = j == i ? skip : 0;
      if (l - s == 0) continue;
      remote.push_back({(void *)(uintptr_t)(base + o + s), (size_t)(l - s)});
      want += l - s;
    }
    if (remote.empty()) break;  // only empty runs left
    struct iovec local = {d + done, (size_t)want};
    ssize_t got = process_vm_readv((pid_t)pid, &local, 1, remote.data(), remote.size(), 0);
    if (got < 0 && errno == EINTR) continue;
    uint64_t at = (uint64_t)r[i] + skip;
    if (got <= 0) {
      int err = got < 0 ? errno : EFAULT;
      std::string what = err == ESRCH ? "process_vm_readv (process gone)" : "process_vm_readv";
      Napi::Error e = ErrnoError(env, what.c_str(), err);
      e.Set("message", Napi::String::New(env, e.Message() + " at offset 0x" + [&] { char b[32]; snprintf(b, sizeof b, "%llx", (unsigned long long)at); return std::string(b); }() +
                                                 " (address 0x" + [&] { char b[32]; snprintf(b, sizeof b, "%llx", (unsigned long long)(base + at)); return std::string(b); }() +
                                                 ") of process " + std::to_string(pid) + ", " + std::to_string(done) + " of " + std::to_string(total) + " bytes read"));
      e.Set("offset", Napi::Number::New(env, (double)at));
      e.Set("bytesRead", Napi::Number::New(env, (double)done));
      throw e;
    }
    // Advance (run i, skip) by got bytes.
    done += (uint64_t)got;
    uint64_t left = (uint64_t)got;
    while (i < n && left > 0) {
      uint64_t rem = (uint64_t)r[i + 1] - skip;
      if (left >= rem) { left -= rem; i += 2; skip = 0; }
      else { skip += left; left = 0; }
    }
    while (i < n && (uint64_t)r[i + 1] == skip) { i += 2; skip = 0; }
  }
  return Napi::Number::New(env, (double)done);
}

// lseek(fd, offset, whence) with whence "data" | "hole" -> offset, or -1 when
// there is no data at or after offset (ENXIO). Finds populated runs of a memfd.
Napi::Value Lseek(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  uint64_t off = ArgU64(info, 1, "offset");
  std::string w = info.Length() > 2 && info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "";
  int whence = w == "data" ? SEEK_DATA : w == "hole" ? SEEK_HOLE : -1;
  if (whence < 0) ThrowType(env, "whence must be \"data\" or \"hole\"");
  off_t r = lseek(fd, (off_t)off, whence);
  if (r < 0) {
    if (errno == ENXIO) return Napi::Number::New(env, -1);
    ThrowErrno(env, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)", errno);
  }
  return Napi::Number::New(env, (double)r);
}

// extendDataRuns(fd, base, size, known: Float64Array, chunk) -> Float64Array
// The [offset, length] runs (relative to base, within size) that may hold data
// of the file: `known` (ascending, from an earlier call) plus every chunk-aligned
// chunk of the gaps between them where SEEK_DATA now finds data. Data never
// leaves a run here (a hole punched later only costs a scan of it), and
// SEEK_HOLE is never used: on shmem it walks every page of the data it skips.
// The cost follows the gaps and the newly populated chunks, not the file size.
Napi::Value ExtendDataRuns(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  uint64_t base = ArgU64(info, 1, "base"), size = ArgU64(info, 2, "size");
  if (info.Length() < 4 || !info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    ThrowType(env, "known must be a Float64Array of [offset, length] pairs");
  Napi::Float64Array known = info[3].As<Napi::Float64Array>();
  uint64_t chunk = ArgU64(info, 4, "chunk");
  if (chunk < PageSize() || (chunk & (chunk - 1))) ThrowType(env, "chunk must be a power of two, at least the page size");
  std::vector<double> out;
  auto emit = [&](uint64_t s, uint64_t e) {
    size_t k = out.size();
    if (k >= 2 && (uint64_t)(out[k - 2] + out[k - 1]) >= s) {
      if ((double)e > out[k - 2] + out[k - 1]) out[k - 1] = (double)e - out[k - 2];
    } else { out.push_back((double)s); out.push_back((double)(e - s)); }
  };
  auto gap = [&](uint64_t a, uint64_t b) {
    uint64_t pos = a;
    while (pos < b) {
      off_t d = lseek(fd, (off_t)(base + pos), SEEK_DATA);
      if (d < 0) {
        if (errno == ENXIO) return;
        ThrowErrno(env, "lseek(SEEK_DATA)", errno);
      }
      uint64_t off = (uint64_t)d - base;
      if ((uint64_t)d < base || off >= b) return;
      uint64_t cs = std::max(a, off & ~(chunk - 1)), ce = std::min(b, (off & ~(chunk - 1)) + chunk);
      emit(cs, ce);
      pos = ce;
    }
  };
  uint64_t cur = 0;
  size_t n = known.ElementLength();
  if (n % 2) ThrowType(env, "known must hold [offset, length] pairs");
  for (size_t i = 0; i < n; i += 2) {
    uint64_t s = (uint64_t)known[i], e = s + (uint64_t)known[i + 1];
    if (s < cur || e > size) ThrowType(env, "known runs must be ascending, within size");
    gap(cur, s);
    emit(s, e);
    cur = e;
  }
  gap(cur, size);
  Napi::Float64Array r = Napi::Float64Array::New(env, out.size());
  if (!out.empty()) memcpy(r.Data(), out.data(), out.size() * sizeof(double));
  return r;
}

// flock(2) without blocking: true when taken, false when another open file
// description holds a conflicting lock (EWOULDBLOCK). mode: "ex", "sh" or "un".
Napi::Value Flock(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  std::string m = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
  int op = m == "ex" ? LOCK_EX : m == "sh" ? LOCK_SH : m == "un" ? LOCK_UN : -1;
  if (op < 0) ThrowType(env, "mode must be \"ex\", \"sh\" or \"un\"");
  int r;
  do r = flock(fd, op | LOCK_NB); while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EWOULDBLOCK) return Napi::Boolean::New(env, false);
    ThrowErrno(env, "flock", errno);
  }
  return Napi::Boolean::New(env, true);
}

// warmFileRuns(fd, runs) -> Promise<bytes>: brings each [offset, length] run of
// the file into the page cache, in the threadpool: readahead is asked for the
// run (POSIX_FADV_WILLNEED), then the run is read through a small scratch
// buffer so the promise resolves only once the pages are cached. A restored
// VM on a private mapping of the file then takes minor faults only.
class WarmFileWorker : public Napi::AsyncWorker {
 public:
  WarmFileWorker(Napi::Env env, int fd, std::vector<double> runs)
      : Napi::AsyncWorker(env), d_(Napi::Promise::Deferred::New(env)), fd_(fd), runs_(std::move(runs)) {}
  Napi::Promise Promise() { return d_.Promise(); }

  void Execute() override {
    std::vector<char> scratch(1 << 20);
    for (size_t i = 0; i + 1 < runs_.size(); i += 2) {
      off_t off = (off_t)runs_[i];
      size_t len = (size_t)runs_[i + 1];
      posix_fadvise(fd_, off, (off_t)len, POSIX_FADV_WILLNEED);  // a hint: failure only loses the readahead
      size_t done = 0;
      while (done < len) {
        ssize_t r = pread(fd_, scratch.data(), std::min(scratch.size(), len - done), off + (off_t)done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { err_ = errno; return; }
        if (r == 0) return;  // past the end: nothing more to cache
        done += (size_t)r;
        bytes_ += (double)r;
      }
    }
  }
  void OnOK() override {
    if (err_) d_.Reject(ErrnoError(Env(), "pread", err_).Value());
    else d_.Resolve(Napi::Number::New(Env(), bytes_));
  }
  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred d_;
  int fd_;
  std::vector<double> runs_;
  double bytes_ = 0;
  int err_ = 0;
};

Napi::Value WarmFileRuns(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) ThrowType(env, "runs must be a Float64Array");
  Napi::Float64Array a = info[1].As<Napi::Float64Array>();
  if (a.ElementLength() % 2) ThrowType(env, "runs must hold [offset, length] pairs");
  std::vector<double> runs(a.Data(), a.Data() + a.ElementLength());
  for (double v : runs) if (!(v >= 0) || v > 9007199254740991.0) ThrowType(env, "runs must be non-negative integers");
  auto *w = new WarmFileWorker(env, fd, std::move(runs));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// dropFileCache(fd): POSIX_FADV_DONTNEED over the whole file (clean pages leave the page cache).
Napi::Value DropFileCache(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0, "fd");
  int r = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  if (r != 0) ThrowErrno(env, "posix_fadvise(DONTNEED)", r);
  return env.Undefined();
}

// Address of a Buffer's first byte (diagnostics and tests).
Napi::Value BufferAddress(const Napi::CallbackInfo &info) {
  Napi::Buffer<uint8_t> b = ArgBuffer(info, 0, "buffer");
  return Napi::Number::New(info.Env(), (double)(uintptr_t)b.Data());
}

}  // namespace

void InitMemory(Napi::Env env, Napi::Object exports) {
  exports.Set("mmapFile", Napi::Function::New(env, MmapFile));
  exports.Set("allocStaging", Napi::Function::New(env, AllocStaging));
  exports.Set("releaseMapping", Napi::Function::New(env, ReleaseMapping));
  exports.Set("copyRuns", Napi::Function::New(env, CopyRuns));
  exports.Set("lseek", Napi::Function::New(env, Lseek));
  exports.Set("extendDataRuns", Napi::Function::New(env, ExtendDataRuns));
  exports.Set("flock", Napi::Function::New(env, Flock));
  exports.Set("processReadRuns", Napi::Function::New(env, ProcessReadRuns));
  exports.Set("bufferAddress", Napi::Function::New(env, BufferAddress));
  exports.Set("warmFileRuns", Napi::Function::New(env, WarmFileRuns));
  exports.Set("dropFileCache", Napi::Function::New(env, DropFileCache));
}

}  // namespace hydra
