#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer on 127.0.0.1, starting them the way this machine does.
# A service that cannot be started is an error: tests never skip for a missing service.
set -euo pipefail

redis_up() { python3 - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 6379), timeout=2); s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}
pg_up() { python3 -c "import socket; socket.create_connection(('127.0.0.1', 5432), timeout=2)" 2>/dev/null; }

if ! redis_up; then
  echo "services: starting Redis on 127.0.0.1:6379"
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.2; done
  redis_up || { echo "services: Redis did not start" >&2; exit 1; }
fi

if ! pg_up; then
  echo "services: starting PostgreSQL on 127.0.0.1:5432"
  command -v pg_ctlcluster >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql; }
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 100); do pg_up && break; sleep 0.2; done
  pg_up || { echo "services: PostgreSQL did not start" >&2; exit 1; }
fi
echo "services: Redis and PostgreSQL are up"
