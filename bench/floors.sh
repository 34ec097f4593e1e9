#!/usr/bin/env bash
# The dependency floors of pyproject.toml, tested: a fresh venv gets the lowest version of every
# direct dependency that pyproject.toml allows (uv's --resolution lowest-direct; torch's floor
# comes from PyPI as a CUDA build, ~3 GB), the suite runs there, and docs/results/floors.md
# records the versions installed and pytest's summary line.
#   bench/floors.sh [VENV] [pytest arguments]    (defaults: /tmp/stepwise-floors, tests)
set -uo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/stepwise-floors}"; shift || true
python3 -m venv "$venv"
"$venv/bin/pip" install -q uv
VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install -q --resolution lowest-direct -e ".[test]"
log="$(mktemp)"
start=$(date +%s)
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}" > "$log" 2>&1
status=$?
mkdir -p docs/results
{
  echo "# Dependency floors"
  echo
  echo "Written by \`bench/floors.sh\` on $(date -u +%Y-%m-%d), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'):"
  echo "the lowest versions pyproject.toml allows for each direct dependency, installed together."
  echo
  echo "| package | installed |"
  echo "|---|---|"
  "$venv/bin/python" - <<'PY'
import re, tomllib
from importlib.metadata import version
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]
    print(f"| {name} | {version(name)} |")
PY
  echo
  echo "\`python -m pytest -q ${*:-tests}\` there ($(( $(date +%s) - start )) s, exit $status):"
  echo
  echo '```'
  grep -E "^(FAILED|ERROR) " "$log" || true
  tail -n 1 "$log"
  echo '```'
} > docs/results/floors.md
cat docs/results/floors.md
exit $status
