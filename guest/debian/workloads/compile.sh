#!/bin/bash
# compile: gcc and make build Lua (the C code base of Debian's lua5.4 source package) from clean,
# HYDRA_SCALE times (default 1); one step per compiled object.
set -eo pipefail
reps=${HYDRA_SCALE:-1}
[ "$reps" -ge 1 ] || reps=1
cp -a /usr/src/hydra/compile-src lua
cd lua
per=$(ls src/*.c | wc -l)
total=$((per * reps))
for ((r = 0; r < reps; r++)); do
  make -s -C src clean >/dev/null
  make -C src linux 2>&1 | awk -v n="$HYDRA_NAME" -v base=$((r * per)) -v t="$total" \
    '/ -c / { printf "hydra-workload: name=%s step=%d of=%d\n", n, base + (++k), t; fflush() }'
done
