#!/bin/sh
# Runs the whole test-suite: as root it runs every sandbox test twice, once as root and
# once as the unprivileged account `sbxtest` (through setpriv); see tests/conftest.py.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${SBX_PYTHON:-/opt/sbx/venv/bin/python}
[ -x "$python" ] || python=$here/.venv/bin/python
cd "$here"
exec "$python" -m pytest -q -rs "$@"
