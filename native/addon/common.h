// Shared helpers for the hydra_native addon. The addon is a thin layer over
// Linux syscalls: no policy, no retries beyond EINTR/EAGAIN where the kernel
// asks for them. Every failure throws a JS Error carrying `errno` (number),
// `code` ("ESRCH", ...) and `syscall` (what was called), so the TypeScript
// layer can turn it into a HydraVM error naming the VM and the step.
#pragma once
#include <napi.h>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <unistd.h>

namespace hydra {

inline Napi::Error ErrnoError(Napi::Env env, const char *syscall, int err) {
  const char *name = strerrorname_np(err);
  std::string msg = std::string(syscall) + ": " + strerror(err) + " (" + (name ? name : "?") + ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("syscall", Napi::String::New(env, syscall));
  return e;
}

[[noreturn]] inline void ThrowErrno(Napi::Env env, const char *syscall, int err) {
  throw ErrnoError(env, syscall, err);
}

[[noreturn]] inline void ThrowType(Napi::Env env, const std::string &msg) {
  throw Napi::TypeError::New(env, msg);
}

// A non-negative integer argument that fits a double exactly (addresses,
// lengths, fds). User-space addresses on x86-64/arm64 are < 2^48.
inline uint64_t ArgU64(const Napi::CallbackInfo &info, size_t i, const char *what) {
  if (info.Length() <= i) ThrowType(info.Env(), std::string("missing argument: ") + what);
  if (info[i].IsBigInt()) {
    bool lossless = false;
    uint64_t v = info[i].As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowType(info.Env(), std::string(what) + " out of range");
    return v;
  }
  if (!info[i].IsNumber()) ThrowType(info.Env(), std::string(what) + " must be a number");
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != (double)(uint64_t)d)
    ThrowType(info.Env(), std::string(what) + " must be a non-negative integer");
  return (uint64_t)d;
}

inline int ArgFd(const Napi::CallbackInfo &info, size_t i, const char *what) {
  uint64_t v = ArgU64(info, i, what);
  if (v > INT32_MAX) ThrowType(info.Env(), std::string(what) + " is not a valid fd");
  return (int)v;
}

inline Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo &info, size_t i, const char *what) {
  if (info.Length() <= i || !info[i].IsBuffer()) ThrowType(info.Env(), std::string(what) + " must be a Buffer");
  return info[i].As<Napi::Buffer<uint8_t>>();
}

inline uint64_t PageSize() {
  static uint64_t ps = 0;
  if (!ps) ps = (uint64_t)sysconf(_SC_PAGESIZE);
  return ps;
}

void InitUffd(Napi::Env env, Napi::Object exports);
void InitMemory(Napi::Env env, Napi::Object exports);
void InitCow(Napi::Env env, Napi::Object exports);

}  // namespace hydra
