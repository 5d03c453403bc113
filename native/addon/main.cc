// hydra_native: syscalls HydraVM needs that Node does not offer.
//   uffd.cc    pidfd, userfaultfd (write-protect and missing modes), PAGEMAP_SCAN
//   memory.cc  mmap-backed Buffers (guest RAM view, pre-faulted staging), batch copy, lseek, flock
//   cow.cc     copy-on-write checkpoints: sync write-protect fault handler and copier threads
#include "common.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  hydra::InitUffd(env, exports);
  hydra::InitMemory(env, exports);
  hydra::InitCow(env, exports);
  exports.Set("pageSize", Napi::Number::New(env, (double)hydra::PageSize()));
  return exports;
}

NODE_API_MODULE(hydra_native, Init)
