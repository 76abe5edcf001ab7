#!/usr/bin/env bash
# Run N `convnet serve` replicas on loopback ports behind nginx, in the foreground. A replica
# that dies is restarted; Ctrl-C or SIGTERM (or a failed start, or nginx dying) stops everything.
#
#   deploy/replicas.sh                          # 2 replicas on :8001, :8002, nginx on :8080
#   REPLICAS=3 PORT=9000 MODEL=runs/cifar10 deploy/replicas.sh -- --workers 1 --threads 8
#
# Settings (environment): REPLICAS (2), PORT (8080, nginx), REPLICA_PORTS (default: 8001, 8002,
# ...), HOST (127.0.0.1), MODEL (the bundled model), CONVNET (.venv/bin/convnet), NGINX (nginx),
# KEEP_RUN_DIR=1 keeps the logs. Arguments after `--` go to every `convnet serve`; so do CONVNET_*
# settings, e.g. CONVNET_API_KEYS_FILE and CONVNET_RATE_LIMIT (README, "API keys, rate limits and
# access logs"). CONVNET_RATE_LIMIT_STORAGE defaults to one file in the run folder, shared by all.
# Pid files, logs and nginx's temp files live in a fresh temporary folder, printed at start.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPLICAS=${REPLICAS:-2}
PORT=${PORT:-8080}
HOST=${HOST:-127.0.0.1}
CONVNET=${CONVNET:-$ROOT/.venv/bin/convnet}
NGINX=${NGINX:-nginx}
READY_TIMEOUT=${READY_TIMEOUT:-60}  # seconds for every replica and nginx to answer
if [[ ${1:-} == "--" ]]; then shift; fi
EXTRA=("$@")

if ! command -v "$NGINX" >/dev/null && [[ ! -x $NGINX ]]; then
  for candidate in /usr/sbin/nginx /usr/local/sbin/nginx; do
    [[ -x $candidate ]] && NGINX=$candidate && break
  done
fi
command -v "$NGINX" >/dev/null || [[ -x $NGINX ]] || { echo "replicas: nginx not found" >&2; exit 1; }

read -r -a PORTS <<< "${REPLICA_PORTS:-$(seq -s ' ' 8001 $((8000 + REPLICAS)))}"
if (( ${#PORTS[@]} != REPLICAS )); then
  echo "replicas: REPLICA_PORTS lists ${#PORTS[@]} ports for $REPLICAS replicas" >&2
  exit 2
fi

RUN_DIR=$(mktemp -d -t convnet-replicas-XXXXXX)
chmod 755 "$RUN_DIR"  # nginx's workers may run as another user when started by root
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp"
# One rate-limit counter file for all replicas (and their workers), so a key's RATE_LIMIT holds
# across them; each `convnet serve` would otherwise count in a file of its own.
export CONVNET_RATE_LIMIT_STORAGE=${CONVNET_RATE_LIMIT_STORAGE:-sqlite://$RUN_DIR/limits.sqlite3}
PIDS=()

stop() {
  trap - EXIT INT TERM
  if [[ -f $RUN_DIR/nginx.pid ]]; then kill -QUIT "$(cat "$RUN_DIR/nginx.pid")" 2>/dev/null || true; fi
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done  # as Ctrl-C would
  # One deadline for all of them (not one each): stopping never takes much over 15 s.
  local deadline=$((SECONDS + 15))
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "replicas: pid $pid still running 15 s after Ctrl-C; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  if [[ ${KEEP_RUN_DIR:-0} == 1 ]]; then
    echo "replicas: stopped; logs in $RUN_DIR" >&2
  else
    rm -rf "$RUN_DIR"
    echo "replicas: stopped" >&2
  fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_replica() {  # start_replica I: (re)start replica I on PORTS[I], appending to its log
  local args=(serve --host "$HOST" --port "${PORTS[$1]}")
  [[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
  "$CONVNET" "${args[@]}" "${EXTRA[@]+"${EXTRA[@]}"}" >> "$RUN_DIR/logs/replica-$1.log" 2>&1 &
  PIDS[$1]=$!
  echo $! > "$RUN_DIR/replica-$1.pid"
}

echo "replicas: run dir $RUN_DIR"
for i in "${!PORTS[@]}"; do start_replica "$i"; done

# The upstream block and the listen address of deploy/nginx.conf, rewritten for these ports.
servers=""
for p in "${PORTS[@]}"; do
  servers+="        server $HOST:$p max_fails=1 fail_timeout=5s;\n"
done
sed -e "/# replicas: begin/,/# replicas: end/c\\
$servers" \
    -e "s|listen 127.0.0.1:8080;|listen $HOST:$PORT;|" \
    "$ROOT/deploy/nginx.conf" > "$RUN_DIR/nginx.conf"

answers() {  # answers URL: whether GET URL succeeds (curl, or Python where curl is missing)
  if command -v curl >/dev/null; then
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "$1" 2>/dev/null
  fi
}

wait_for() {  # wait_for URL NAME PID: until URL answers 200, or PID dies, or time runs out
  local deadline=$((SECONDS + READY_TIMEOUT))
  until answers "$1"; do
    if ! kill -0 "$3" 2>/dev/null; then echo "replicas: $2 exited during start-up" >&2; return 1; fi
    if (( SECONDS > deadline )); then echo "replicas: $2 not ready in ${READY_TIMEOUT} s" >&2; return 1; fi
    sleep 0.3
  done
}

for i in "${!PORTS[@]}"; do
  wait_for "http://$HOST:${PORTS[$i]}/readyz" "replica $i (port ${PORTS[$i]})" "${PIDS[$i]}" || {
    tail -n 20 "$RUN_DIR/logs/replica-$i.log" >&2; exit 1; }
done

"$NGINX" -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_for "http://$HOST:$PORT/readyz" nginx "$NGINX_PID" || { cat "$RUN_DIR/logs/error.log" >&2; exit 1; }

echo "replicas: ready: nginx http://$HOST:$PORT/ -> ports ${PORTS[*]} (pids ${PIDS[*]})"
# Supervise until Ctrl-C: a replica that dies is started again (nginx sends its traffic to the
# others meanwhile); if nginx itself dies, everything stops.
while kill -0 "$NGINX_PID" 2>/dev/null; do
  for i in "${!PORTS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      wait "${PIDS[$i]}" 2>/dev/null || true
      echo "replicas: replica $i (port ${PORTS[$i]}) exited; starting it again" >&2
      start_replica "$i"
    fi
  done
  sleep 1
done
echo "replicas: nginx exited; stopping the replicas" >&2
exit 1
