#!/usr/bin/env bash
# npm dependencies and the TypeScript build, only when missing or stale.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "bootstrap: installing npm dependencies" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi
stamp=dist/.build-stamp
if [ ! -f "$stamp" ] || [ -n "$(find src test bench tsconfig.json package.json -newer "$stamp" \( -name '*.ts' -o -name '*.json' \) 2>/dev/null | head -1)" ]; then
  echo "bootstrap: compiling TypeScript" >&2
  npx tsc -p tsconfig.json
  touch "$stamp"
fi
