#!/usr/bin/env bash
# The long suite: multi-minute runs with real QEMU guests (test/long/*.test.ts), kept out of `npm test`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
node dist/src/cli/main.js setup
mapfile -t files < <(find dist/test/long -name '*.test.js' 2>/dev/null | sort)
if [ "${#files[@]}" -eq 0 ]; then echo "no long test files found" >&2; exit 1; fi
exec node --test --test-concurrency=1 --test-timeout=1800000 "$@" "${files[@]}"
