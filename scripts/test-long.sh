#!/usr/bin/env bash
# Long runs, kept out of `npm test`: every dist/test/long/*.test.js. The HA chaos
# loop (CHAOS_FAILURES and CHAOS_SEED tune it) and the tests with a real Debian
# guest (systemd, redis) on a qcow2 root disk and a NIC: they build the Debian
# image once (cached in HYDRAVM_CACHE), create a bridge and a network namespace
# (HYDRAVM_TEST_NET_PREFIX, default "hvt-"; addresses from HYDRAVM_TEST_SUBNET,
# default 198.18.90) and need root. The namespaced-cluster tests take their own
# prefix and /24 (HYDRAVM_TEST_NETNS_PREFIX / HYDRAVM_TEST_NETNS_SUBNET for the
# Debian one). Extra arguments go to node --test.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
node dist/src/cli/main.js setup
mapfile -t files < <(find dist/test/long -name '*.test.js' 2>/dev/null | sort)
if [ "${#files[@]}" -eq 0 ]; then echo "no long test files found in dist/test/long" >&2; exit 1; fi
exec node --test --test-concurrency=1 --test-timeout=14400000 "$@" "${files[@]}"
