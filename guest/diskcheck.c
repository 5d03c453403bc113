/*
 * diskcheck: guest disk/memory consistency checker for HydraVM tests.
 *
 * Writes numbered 4 KiB records to a block device with O_DIRECT + fdatasync
 * and keeps the number of synced records in memory. Record number n lives in
 * slot n % capacity. After every write it reads back:
 *   - the slot after the last synced record: it must not hold a record of this
 *     run numbered >= the count memory knows (disk ahead of memory);
 *   - the last few records and some random ones: each must be present, intact
 *     and carry its number (disk behind memory / lost writes).
 * A full check of every record up to the count runs at start and whenever the
 * clock jumps by more than 2 s between iterations (the VM was paused/restored).
 * The run id is random at first start and kept in memory, so a restored VM
 * keeps checking its own records.
 *
 * Usage: diskcheck [--dev /dev/vda] [--rate 20] [--seed S]
 *
 * Output (stdout = serial console), at most ~4 progress lines a second:
 *   diskcheck: start dev=<D> size_mb=<M> capacity=<C> run=<hex> rate=<R>
 *   diskcheck: records=<N> run=<hex> checked=<K> violations=<V>
 *   diskcheck: full-check records=<N> checked=<K> violations=<V> ms=<T> reason=<start|time-jump>
 *   DISKCHECK VIOLATION: slot=<s> expected_seq=<n> found_seq=<m> found_run=<hex> what=<...> records=<N>
 *
 * Build: gcc -static -O2 -o diskcheck diskcheck.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REC 4096u
#define WORDS (REC / 8u)
#define MAGIC 0x4859445241444b31ull /* "HYDRADK1" */
#define CHUNK_RECS 256u             /* full check reads 1 MiB at a time */

/* Record layout (64-bit words):
 *   [0] MAGIC [1] seq [2] run id [3] write time (ns, realtime)
 *   [4 .. WORDS-1) fill derived from (seq, run)  [WORDS-1] checksum of [0..WORDS-1) */

static int fd;
static uint64_t capacity;  /* records that fit */
static uint64_t run_id;
static uint64_t count;     /* records written AND synced: lives in guest memory */
static uint64_t violations;
static uint64_t checked;
static uint64_t rng;
static unsigned char *buf; /* aligned, CHUNK_RECS records */
static const char *dev = "/dev/vda";

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1Dull;
}

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

static double now_s(clockid_t c) {
  struct timespec ts;
  clock_gettime(c, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t checksum(const uint64_t *r) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned w = 0; w < WORDS - 1; w++) h = (h ^ r[w]) * 0x100000001b3ull;
  return h;
}

static void fill_record(uint64_t *r, uint64_t seq) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  r[0] = MAGIC;
  r[1] = seq;
  r[2] = run_id;
  r[3] = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
  uint64_t s = mix(seq ^ (run_id << 1));
  for (unsigned w = 4; w < WORDS - 1; w++) r[w] = s + w * 0x9e3779b97f4a7c15ull;
  r[WORDS - 1] = checksum(r);
}

/* Is r an intact record (any run)? */
static int record_intact(const uint64_t *r) {
  return r[0] == MAGIC && r[WORDS - 1] == checksum(r);
}

static void violation(uint64_t slot, uint64_t expect, const uint64_t *r, const char *what) {
  violations++;
  printf("DISKCHECK VIOLATION: slot=%llu expected_seq=%llu found_seq=%llu found_run=%016llx "
         "run=%016llx what=%s records=%llu violations=%llu\n",
         (unsigned long long)slot, (unsigned long long)expect,
         (unsigned long long)(r[0] == MAGIC ? r[1] : 0), (unsigned long long)(r[0] == MAGIC ? r[2] : 0),
         (unsigned long long)run_id, what, (unsigned long long)count, (unsigned long long)violations);
  fflush(stdout);
}

static int read_slots(uint64_t slot, unsigned n) {
  ssize_t want = (ssize_t)n * REC;
  ssize_t got = pread(fd, buf, (size_t)want, (off_t)(slot * REC));
  if (got != want) {
    printf("DISKCHECK ERROR: read %s slot %llu: %s\n", dev, (unsigned long long)slot,
           got < 0 ? strerror(errno) : "short read");
    fflush(stdout);
    return -1;
  }
  return 0;
}

/* Record seq (< count) must be present in its slot. */
static void check_present_rec(uint64_t seq, const uint64_t *r) {
  checked++;
  uint64_t slot = seq % capacity;
  if (!record_intact(r)) violation(slot, seq, r, r[0] == MAGIC ? "torn-record" : "missing-record");
  else if (r[2] != run_id) violation(slot, seq, r, "foreign-run");
  else if (r[1] != seq) violation(slot, seq, r, r[1] < seq ? "stale-record" : "record-from-future");
}

/* The slot of record `count` must not hold a record of this run >= count. */
static void check_next_rec(const uint64_t *r) {
  checked++;
  if (record_intact(r) && r[2] == run_id && r[1] >= count)
    violation(count % capacity, count, r, "disk-ahead-of-memory");
}

static void check_one(uint64_t seq) {
  if (read_slots(seq % capacity, 1) == 0) check_present_rec(seq, (const uint64_t *)buf);
}

static void check_next(void) {
  if (read_slots(count % capacity, 1) == 0) check_next_rec((const uint64_t *)buf);
}

static void full_check(const char *reason) {
  double t0 = now_s(CLOCK_MONOTONIC);
  uint64_t first = count > capacity ? count - capacity : 0;
  uint64_t before = checked;
  for (uint64_t seq = first; seq < count;) {
    uint64_t slot = seq % capacity;
    uint64_t n = count - seq;
    if (n > CHUNK_RECS) n = CHUNK_RECS;
    if (n > capacity - slot) n = capacity - slot;
    if (read_slots(slot, (unsigned)n) != 0) return;
    for (uint64_t k = 0; k < n; k++) check_present_rec(seq + k, (const uint64_t *)(buf + k * REC));
    seq += n;
  }
  check_next();
  printf("diskcheck: full-check records=%llu checked=%llu violations=%llu ms=%.0f reason=%s\n",
         (unsigned long long)count, (unsigned long long)(checked - before),
         (unsigned long long)violations, (now_s(CLOCK_MONOTONIC) - t0) * 1000.0, reason);
  fflush(stdout);
}

static void usage(void) {
  fprintf(stderr, "usage: diskcheck [--dev /dev/vda] [--rate RECORDS_PER_S (0=unlimited)] [--seed S]\n");
  exit(2);
}

int main(int argc, char **argv) {
  double rate = 20;
  uint64_t seed = 0;
  int have_seed = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--dev") && i + 1 < argc) dev = argv[++i];
    else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = strtod(argv[++i], NULL);
    else if (!strcmp(argv[i], "--seed") && i + 1 < argc) { seed = strtoull(argv[++i], NULL, 0); have_seed = 1; }
    else usage();
  }
  setvbuf(stdout, NULL, _IOLBF, 0);

  /* The device node may appear a moment after the driver loads. */
  for (int tries = 0;; tries++) {
    fd = open(dev, O_RDWR | O_DIRECT);
    if (fd >= 0) break;
    if (tries >= 100) {
      printf("DISKCHECK ERROR: open %s: %s\n", dev, strerror(errno));
      return 1;
    }
    usleep(100000);
  }
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
    struct stat sb;
    if (fstat(fd, &sb) == 0) size = (uint64_t)sb.st_size;
  }
  capacity = size / REC;
  if (capacity < 2) {
    printf("DISKCHECK ERROR: %s too small (%llu bytes)\n", dev, (unsigned long long)size);
    return 1;
  }
  if (posix_memalign((void **)&buf, REC, CHUNK_RECS * REC) != 0) {
    printf("DISKCHECK ERROR: out of memory\n");
    return 1;
  }
  uint64_t r = 0;
  if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) r = 0;
  r ^= (uint64_t)(now_s(CLOCK_REALTIME) * 1e9) ^ ((uint64_t)getpid() << 32);
  if (have_seed) r = seed;
  run_id = mix(r) | 1;
  rng = mix(run_id + 7) | 1;

  printf("diskcheck: start dev=%s size_mb=%llu capacity=%llu run=%016llx rate=%g\n", dev,
         (unsigned long long)(size >> 20), (unsigned long long)capacity,
         (unsigned long long)run_id, rate);
  fflush(stdout);
  full_check("start");

  double interval = rate > 0 ? 1.0 / rate : 0;
  double next = now_s(CLOCK_MONOTONIC);
  double gap_mono = next, gap_real = now_s(CLOCK_REALTIME);
  double last_print = 0;
  uint64_t *wr = (uint64_t *)buf;

  for (;;) {
    double mono = now_s(CLOCK_MONOTONIC);
    double slept = 0;
    if (interval > 0) {
      if (next > mono) {
        slept = next - mono;
        struct timespec ts = {(time_t)slept, (long)((slept - (double)(time_t)slept) * 1e9)};
        nanosleep(&ts, NULL);
      }
      next += interval;
    }
    mono = now_s(CLOCK_MONOTONIC);
    double real = now_s(CLOCK_REALTIME);
    double dm = mono - gap_mono - slept, dr = real - gap_real - slept;
    if (dm > 2.0 || dr > 2.0 || dr < -2.0) {
      printf("diskcheck: time-jump mono=%.1fs real=%.1fs records=%llu\n", dm, dr,
             (unsigned long long)count);
      full_check("time-jump");
      mono = now_s(CLOCK_MONOTONIC);
      gap_mono = mono;
      gap_real = now_s(CLOCK_REALTIME);
    }
    if (next < mono - 0.5) next = mono; /* do not burst after a stall */

    /* Write record `count`, make it durable, then (only then) count it. */
    fill_record(wr, count);
    ssize_t n = pwrite(fd, wr, REC, (off_t)((count % capacity) * REC));
    if (n != (ssize_t)REC) {
      printf("DISKCHECK ERROR: write %s record %llu: %s\n", dev, (unsigned long long)count,
             n < 0 ? strerror(errno) : "short write");
      fflush(stdout);
      sleep(1);
      gap_mono = now_s(CLOCK_MONOTONIC);
      gap_real = now_s(CLOCK_REALTIME);
      continue;
    }
    if (fdatasync(fd) != 0) {
      printf("DISKCHECK ERROR: fdatasync %s: %s\n", dev, strerror(errno));
      fflush(stdout);
      sleep(1);
      gap_mono = now_s(CLOCK_MONOTONIC);
      gap_real = now_s(CLOCK_REALTIME);
      continue;
    }
    count++;

    /* Sample: the next slot, the last few records, a few random ones. */
    check_next();
    for (uint64_t k = 1; k <= 3 && k <= count; k++) check_one(count - k);
    uint64_t window = count < capacity ? count : capacity;
    for (int k = 0; k < 2 && window > 0; k++) check_one(count - 1 - xorshift(&rng) % window);

    mono = now_s(CLOCK_MONOTONIC);
    gap_mono = mono;
    gap_real = now_s(CLOCK_REALTIME);
    if (mono - last_print >= 0.25) {
      last_print = mono;
      printf("diskcheck: records=%llu run=%016llx checked=%llu violations=%llu\n",
             (unsigned long long)count, (unsigned long long)run_id, (unsigned long long)checked,
             (unsigned long long)violations);
      fflush(stdout);
    }
  }
}
