#!/usr/bin/env bash
# The test suite: unit tests beside the code (src/**/*.test.ts) and
# multi-process tests with real QEMU guests (test/*.test.ts); test/long/ is `npm run test:long`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
node scripts/check-imports.mjs
node scripts/check-swallowed.mjs
node dist/src/cli/main.js setup
# Long runs (dist/test/long/) are `npm run test:long`.
mapfile -t files < <(find dist/src dist/test -name '*.test.js' -not -path 'dist/test/long/*' 2>/dev/null | sort)
if [ "${#files[@]}" -eq 0 ]; then echo "no test files found" >&2; exit 1; fi
exec node --test --test-concurrency=1 --test-timeout=600000 "$@" "${files[@]}"
