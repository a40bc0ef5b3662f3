#!/usr/bin/env bash
# Runs reflect_watch.py with grpcio and grpcio-reflection installed from PyPI into a folder of
# the target directory (once; later runs reuse it). Fails loudly when they cannot be installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deps="${CAPSTAN_PYTHON_DEPS:-$here/../../../../target/python-grpc}"
if ! PYTHONPATH="$deps" python3 -c 'import grpc, grpc_reflection' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$deps" \
    'grpcio>=1.60' 'grpcio-reflection>=1.60' >&2
fi
PYTHONPATH="$deps" exec python3 "$here/reflect_watch.py" "$@"
