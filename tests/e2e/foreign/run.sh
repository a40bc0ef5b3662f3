#!/usr/bin/env bash
# Runs publish_nats.py with nats-py and the CloudEvents SDK installed from PyPI into a folder of
# the target directory (once; later runs reuse it). Fails loudly when they cannot be installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deps="${CAPSTAN_PYTHON_CE_DEPS:-$here/../../../target/python-ce}"
if ! PYTHONPATH="$deps" python3 -c "import nats; from cloudevents.conversion import to_structured" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$deps" 'nats-py>=2.6' 'cloudevents>=1.10,<2' >&2
fi
PYTHONPATH="$deps" exec python3 "$here/publish_nats.py" "$@"
