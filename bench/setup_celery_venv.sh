#!/usr/bin/env bash
# Create /work/main/.venv-celery: the CeleryExecutor comparison environment for bench/run.py.
#
# apache-airflow-providers-celery 3.26.0 cannot import with celery 5.7.0 (`cannot import name 'retry'
# from celery.backends.database`), so the comparison runs on celery/kombu 5.6.x in a venv of its own.
# Our provider is deliberately NOT installed there: CeleryExecutor runs on stock Airflow only.
#
# Idempotent: when the venv exists and imports the celery executor at the pinned versions, this
# script exits at once without touching the network. Anything else (missing or half-built venv)
# is rebuilt from scratch.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${CELERY_VENV:-$REPO/.venv-celery}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
REQUIREMENTS=(
    "apache-airflow==3.3.2"
    "apache-airflow-providers-celery==3.26.0"
    "celery==5.6.2"
    "kombu>=5.6,<5.7"
    "psycopg2-binary>=2.9"
    "asyncpg>=0.29"
    "redis>=5"
)
SPEC="${REQUIREMENTS[*]}"
MARKER="$VENV/.asyncq-bench-spec"

check() {
    [ -x "$VENV/bin/airflow" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$SPEC" ] &&
        "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import celery, kombu
assert celery.__version__.startswith("5.6."), celery.__version__
assert kombu.__version__.startswith("5.6."), kombu.__version__
assert md.version("apache-airflow") == "3.3.2"
assert md.version("apache-airflow-providers-celery") == "3.26.0"
import psycopg2, asyncpg, redis  # noqa: F401
from airflow.providers.celery.executors.celery_executor import CeleryExecutor  # noqa: F401
EOF
}

if check; then
    echo "$VENV is ready (${SPEC})"
    exit 0
fi

if [ -e "$VENV" ]; then
    echo "$VENV exists but is incomplete or has other versions; rebuilding it"
    rm -rf "$VENV"
fi
echo "creating $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
# The local mirror prints one warning per package it does not hold; keep the real errors only.
"$VENV/bin/python" -m pip install --quiet "${REQUIREMENTS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$SPEC" >"$MARKER"
if ! check; then
    echo "error: $VENV was built but does not import CeleryExecutor at the pinned versions" >&2
    "$VENV/bin/python" -c "from airflow.providers.celery.executors.celery_executor import CeleryExecutor" || true
    exit 1
fi
echo "$VENV is ready (${SPEC})"
