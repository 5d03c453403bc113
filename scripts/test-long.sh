#!/usr/bin/env bash
# Long runs, kept out of `npm test`: every dist/test/long/*.test.js (e.g. the
# HA chaos loop). Extra arguments go to node --test; CHAOS_FAILURES and
# CHAOS_SEED tune the chaos loop.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
node dist/src/cli/main.js setup
mapfile -t files < <(find dist/test/long -name '*.test.js' 2>/dev/null | sort)
if [ "${#files[@]}" -eq 0 ]; then echo "no long test files found in dist/test/long" >&2; exit 1; fi
exec node --test --test-concurrency=1 --test-timeout=14400000 "$@" "${files[@]}"
