#!/bin/bash
# compile: gcc and make build Lua (the C code base of Debian's lua5.4 source package) from clean,
# HYDRA_SCALE times (default 1); one step per compiled object. -O0 (after the Makefile's -O2)
# scales it to TCG: at -O2 one build takes over two minutes of a host core there.
set -eo pipefail
reps=${HYDRA_SCALE:-1}
[ "$reps" -ge 1 ] || reps=1
cp -a /usr/src/hydra/compile-src lua
cd lua
per=$(ls src/*.c | wc -l)
total=$((per * reps))
step=0
# lastpipe: the loops below run in this shell, so step counts on across repetitions.
shopt -s lastpipe
for ((r = 0; r < reps; r++)); do
  make -s -C src clean >/dev/null
  # A bash loop, not awk: Debian's awk (mawk) reads a pipe in blocks, which would hold the lines back.
  make -C src linux MYCFLAGS=-O0 2>&1 | while IFS= read -r line; do
    case "$line" in
      *' -c '*) step=$((step + 1)); echo "hydra-workload: name=$HYDRA_NAME step=$step of=$total" ;;
    esac
  done
done
