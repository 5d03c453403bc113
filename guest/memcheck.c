/*
 * memcheck: guest memory invariant checker for HydraVM tests.
 *
 * Keeps a region of N MB (array of 4 KiB pages) under random and sequential
 * writes. Every page carries its index and generation in a header and again
 * in a footer, a fill pattern derived from (index, gen) and a checksum of
 * that fill. A separate array holds the generation every page must have.
 * A page that is torn, stale (from an older epoch), or belongs to another
 * index is reported as a violation. All state (step counter, expected
 * generations, RNG, sweep cursor) lives in this process's memory, so after a
 * VM is restored from a checkpoint the checker continues from the step the
 * memory image was taken at.
 *
 * Usage: memcheck [--mb 64] [--rate-mb 0] [--seed S] [--batch 64]
 *                 [--full-every-s 10] [--selftest-corrupt N]
 *
 * Output (stdout = serial console), at most ~4 progress lines a second:
 *   memcheck: start mb=<M> seed=<S>
 *   memcheck: step=<N> pages=<P> gen_sum=<G> violations=<V>
 *   memcheck: full-verify step=<N> pages=<P> violations=<V> ms=<T> reason=<periodic|time-jump|request|selftest>
 *   MEMCHECK VIOLATION: page=<i> expected_index=<i> found_index=<j> expected_gen=<g> found_gen=<h> what=<...> step=<N>
 *
 * A line containing "verify" on the console (/dev/console, opened by memcheck
 * itself: a background job's stdin is /dev/null) requests a full verification
 * at once (reason=request). A restore brings no time jump (the guest's clocks
 * follow the VM), so the host asks this way after every restore.
 *
 * Build: gcc -static -O2 -o memcheck memcheck.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAGIC_HEAD 0x48594452414d4348ull /* "HYDRAMCH" */
#define MAGIC_FOOT 0x464f4f544d434b21ull /* "FOOTMCK!" */

/* Page layout (64-bit words):
 *   [0] MAGIC_HEAD   [1] index   [2] gen   [3] checksum of fill words
 *   [4 .. WORDS-4)  fill: pattern(index, gen, w)
 *   [WORDS-3] gen    [WORDS-2] index   [WORDS-1] MAGIC_FOOT */
#define FILL_START 4u
#define FILL_END (WORDS - 3u)

struct state {
  uint64_t step;       /* monotonic, lives in guest memory */
  uint64_t gen_sum;    /* sum of expected generations */
  uint64_t violations;
  uint64_t rng;
  uint64_t cursor;     /* sequential sweep position */
  uint64_t written_pages;
};

static uint64_t *region;     /* npages * WORDS */
static uint64_t *expected;   /* expected generation per page */
static uint64_t npages;
static struct state st;

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1Dull;
}

static inline uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

static inline uint64_t pattern_seed(uint64_t idx, uint64_t gen) {
  return mix((idx << 20) ^ gen ^ 0x9e3779b97f4a7c15ull);
}

static inline uint64_t pattern_word(uint64_t seed, uint64_t w) {
  return seed + w * 0x9e3779b97f4a7c15ull;
}

static double now_s(clockid_t c) {
  struct timespec ts;
  clock_gettime(c, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void write_page(uint64_t idx, uint64_t gen) {
  uint64_t *p = region + idx * WORDS;
  uint64_t seed = pattern_seed(idx, gen);
  uint64_t sum = 0;
  for (uint64_t w = FILL_START; w < FILL_END; w++) {
    uint64_t v = pattern_word(seed, w);
    p[w] = v;
    sum = (sum ^ v) * 0x100000001b3ull + w;
  }
  p[0] = MAGIC_HEAD;
  p[1] = idx;
  p[2] = gen;
  p[3] = sum;
  p[WORDS - 3] = gen;
  p[WORDS - 2] = idx;
  p[WORDS - 1] = MAGIC_FOOT;
}

/* Returns 0 if page idx is intact at its expected generation; else reports. */
static int verify_page(uint64_t idx) {
  const uint64_t *p = region + idx * WORDS;
  uint64_t gen = expected[idx];
  const char *what = NULL;
  if (p[0] != MAGIC_HEAD) what = "header-magic";
  else if (p[1] != idx) what = "header-index";
  else if (p[2] != gen) what = "header-gen";
  else if (p[WORDS - 1] != MAGIC_FOOT) what = "footer-magic";
  else if (p[WORDS - 2] != idx) what = "footer-index";
  else if (p[WORDS - 3] != gen) what = "footer-gen";
  else {
    uint64_t seed = pattern_seed(idx, gen);
    uint64_t sum = 0;
    int bad_fill = 0;
    for (uint64_t w = FILL_START; w < FILL_END; w++) {
      uint64_t v = p[w];
      if (v != pattern_word(seed, w)) bad_fill = 1;
      sum = (sum ^ v) * 0x100000001b3ull + w;
    }
    if (sum != p[3]) what = "checksum";
    else if (bad_fill) what = "fill-pattern";
  }
  if (!what) return 0;
  st.violations++;
  printf("MEMCHECK VIOLATION: page=%llu expected_index=%llu found_index=%llu "
         "expected_gen=%llu found_gen=%llu found_footer_gen=%llu what=%s step=%llu violations=%llu\n",
         (unsigned long long)idx, (unsigned long long)idx, (unsigned long long)p[1],
         (unsigned long long)gen, (unsigned long long)p[2], (unsigned long long)p[WORDS - 3],
         what, (unsigned long long)st.step, (unsigned long long)st.violations);
  fflush(stdout);
  return 1;
}

/* Verify, then advance a page to the next generation. A bad page is
 * rewritten too, so each corruption is counted once. */
static void touch_page(uint64_t idx) {
  verify_page(idx);
  uint64_t g = expected[idx] + 1;
  write_page(idx, g);
  expected[idx] = g;
  st.gen_sum++;
  st.written_pages++;
}

static void full_verify(const char *reason) {
  double t0 = now_s(CLOCK_MONOTONIC);
  uint64_t before = st.violations;
  for (uint64_t i = 0; i < npages; i++) {
    if (verify_page(i)) {
      write_page(i, expected[i]); /* repair so it is counted once */
    }
  }
  printf("memcheck: full-verify step=%llu pages=%llu violations=%llu new=%llu ms=%.0f reason=%s\n",
         (unsigned long long)st.step, (unsigned long long)npages,
         (unsigned long long)st.violations, (unsigned long long)(st.violations - before),
         (now_s(CLOCK_MONOTONIC) - t0) * 1000.0, reason);
  fflush(stdout);
}

/* Console requests: non-blocking reads of whole lines (the tty is canonical). */
static int console_fd = -1;

static int console_requests_verify(void) {
  if (console_fd < 0) return 0;
  char buf[256];
  int want = 0;
  for (;;) {
    ssize_t n = read(console_fd, buf, sizeof buf - 1);
    if (n <= 0) break;
    buf[n] = 0;
    if (strstr(buf, "verify")) want = 1;
  }
  return want;
}

static void usage(void) {
  fprintf(stderr, "usage: memcheck [--mb N (8..1024)] [--rate-mb MBps (0=unlimited)] [--seed S] "
                  "[--batch PAGES] [--full-every-s SECONDS (0=never)] [--selftest-corrupt STEP]\n");
  exit(2);
}

static unsigned long long arg_num(int argc, char **argv, int *i) {
  if (*i + 1 >= argc) usage();
  char *end;
  errno = 0;
  unsigned long long v = strtoull(argv[++*i], &end, 0);
  if (errno || *end) usage();
  return v;
}

int main(int argc, char **argv) {
  unsigned long long mb = 64, rate_mb = 0, seed = 0, batch = 64, full_every_s = 10;
  unsigned long long corrupt_at = 0;
  int have_seed = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--mb")) mb = arg_num(argc, argv, &i);
    else if (!strcmp(a, "--rate-mb") || !strcmp(a, "--rate")) rate_mb = arg_num(argc, argv, &i);
    else if (!strcmp(a, "--seed")) { seed = arg_num(argc, argv, &i); have_seed = 1; }
    else if (!strcmp(a, "--batch")) batch = arg_num(argc, argv, &i);
    else if (!strcmp(a, "--full-every-s")) full_every_s = arg_num(argc, argv, &i);
    else if (!strcmp(a, "--selftest-corrupt")) corrupt_at = arg_num(argc, argv, &i);
    else usage();
  }
  if (mb < 1 || mb > 65536) usage();
  if (batch < 1) batch = 1;
  if (!have_seed) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) r = 0;
    seed = (r ^ (uint64_t)(now_s(CLOCK_REALTIME) * 1e6)) & 0xffffffffull;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);

  npages = mb * 1024ull * 1024ull / PAGE;
  region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  expected = mmap(NULL, npages * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (region == MAP_FAILED || expected == MAP_FAILED) {
    printf("MEMCHECK ERROR: cannot map %llu MB: %s\n", mb, strerror(errno));
    return 1;
  }
  console_fd = open("/dev/console", O_RDONLY | O_NONBLOCK | O_NOCTTY);
  st.rng = mix(seed + 1) | 1;
  printf("memcheck: start mb=%llu seed=%llu pages=%llu rate_mb=%llu batch=%llu\n",
         mb, seed, (unsigned long long)npages, rate_mb, batch);
  fflush(stdout);

  /* Generation 1 everywhere. */
  for (uint64_t i = 0; i < npages; i++) {
    write_page(i, 1);
    expected[i] = 1;
  }
  st.gen_sum = npages;

  /* Token bucket in pages; capped so a pause/resume does not burst. */
  const double pages_per_s = rate_mb ? (double)rate_mb * (1024.0 * 1024.0 / PAGE) : 0;
  double tokens = 0;
  double last_tok = now_s(CLOCK_MONOTONIC);
  /* End of the previous iteration: a gap > 2 s to the next one means the VM
   * was paused/resumed (or restored), so verify everything. */
  double gap_mono = last_tok, gap_real = now_s(CLOCK_REALTIME);
  double last_print = 0;
  double last_full = last_tok;
  double last_console = last_tok;
  int corrupted = 0;

  for (;;) {
    double mono = now_s(CLOCK_MONOTONIC);
    double real = now_s(CLOCK_REALTIME);
    if (mono - last_console >= 0.05) {
      last_console = mono;
      if (console_requests_verify()) {
        full_verify("request");
        mono = now_s(CLOCK_MONOTONIC);
        real = now_s(CLOCK_REALTIME);
        last_tok = mono;
        gap_mono = mono;
        gap_real = real;
      }
    }
    double dm = mono - gap_mono, dr = real - gap_real;
    if (dm > 2.0 || dr > 2.0 || dr < -2.0) {
      printf("memcheck: time-jump mono=%.1fs real=%.1fs step=%llu\n", dm, dr,
             (unsigned long long)st.step);
      full_verify("time-jump");
      mono = now_s(CLOCK_MONOTONIC);
      last_tok = mono;
      gap_mono = mono;
      gap_real = now_s(CLOCK_REALTIME);
    }

    if (pages_per_s > 0) {
      tokens += (mono - last_tok) * pages_per_s;
      last_tok = mono;
      double cap = pages_per_s * 0.25 > (double)batch ? pages_per_s * 0.25 : (double)batch;
      if (tokens > cap) tokens = cap;
      if (tokens < (double)batch) {
        double wait = ((double)batch - tokens) / pages_per_s;
        if (wait > 0.25) wait = 0.25;
        struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        nanosleep(&ts, NULL);
        gap_mono += wait; /* a stop during the sleep still shows as a gap */
        gap_real += wait;
        continue;
      }
      tokens -= (double)batch;
    }

    st.step++;
    /* Mix: even steps a random batch, odd steps a sequential sweep. */
    if (st.step & 1) {
      for (uint64_t k = 0; k < batch; k++) touch_page(xorshift(&st.rng) % npages);
    } else {
      for (uint64_t k = 0; k < batch; k++) {
        touch_page(st.cursor);
        st.cursor = (st.cursor + 1) % npages;
      }
    }

    if (corrupt_at && !corrupted && st.step >= corrupt_at) {
      /* Prove the checker can fail: one stale page (valid content of the
       * previous generation) and one torn page (a flipped word). */
      uint64_t a = xorshift(&st.rng) % npages;
      uint64_t b = (a + npages / 2) % npages;
      if (expected[a] > 1) write_page(a, expected[a] - 1);
      else write_page(a, expected[a] + 7);
      region[b * WORDS + WORDS / 2] ^= 0x0100;
      printf("memcheck: selftest-corrupt step=%llu stale_page=%llu torn_page=%llu\n",
             (unsigned long long)st.step, (unsigned long long)a, (unsigned long long)b);
      fflush(stdout);
      corrupted = 1;
      full_verify("selftest");
    }

    if (full_every_s && now_s(CLOCK_MONOTONIC) - last_full >= (double)full_every_s) {
      full_verify("periodic");
      last_full = now_s(CLOCK_MONOTONIC);
    }

    mono = now_s(CLOCK_MONOTONIC);
    gap_mono = mono;
    gap_real = now_s(CLOCK_REALTIME);
    if (mono - last_print >= 0.25) {
      last_print = mono;
      printf("memcheck: step=%llu pages=%llu gen_sum=%llu violations=%llu\n",
             (unsigned long long)st.step, (unsigned long long)npages,
             (unsigned long long)st.gen_sum, (unsigned long long)st.violations);
      fflush(stdout);
    }
  }
}
