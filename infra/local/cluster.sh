#!/usr/bin/env bash
# Local stand-in for the cluster: a Ray head and an MLflow tracking server, both bound to 127.0.0.1,
# started from the project's .venv, each as its own process group (setsid), with their state under
# one directory.
#
#   infra/local/cluster.sh up       start both (idempotent), wait until both answer HTTP, print the
#                                   env lines and the `ray job submit` command to use
#   infra/local/cluster.sh status   say what runs (exit 0: both up, 3: not both up)
#   infra/local/cluster.sh down     stop exactly the two recorded process groups (SIGTERM, then
#                                   SIGKILL if they linger) and remove the PID files (idempotent)
#
# Environment:
#   LEARN_CLUSTER_DIR     state directory (default: <repo>/.cluster): PID files, logs, the Ray temp
#                         dir, the auth token (mode 600), mlflow.db and the MLflow artifacts
#   LEARN_VENV            the virtual environment with ray and mlflow (default: <repo>/.venv)
#   LEARN_RAY_DASHBOARD_PORT (8265)  LEARN_RAY_GCS_PORT (6379)  LEARN_MLFLOW_PORT (5000)
#   LEARN_RAY_CLIENT_PORT (10001)  LEARN_RAY_AGENT_PORT (52365)  LEARN_RAY_AGENT_GRPC_PORT (52366)
#   LEARN_RAY_RUNTIME_ENV_PORT (52367)  LEARN_RAY_METRICS_PORT (52368)
#   LEARN_RAY_NODE_MANAGER_PORT (52369)  LEARN_RAY_OBJECT_MANAGER_PORT (52370)
#   LEARN_RAY_NUM_CPUS    CPUs the head offers to tasks (default: Ray's own count)
#   LEARN_CLUSTER_TIMEOUT seconds to wait for each server to answer (default 180)
#
# Ray 2.60 turns token authentication on when a token exists; this head always uses its own token
# (RAY_AUTH_MODE=token), kept in <state>/auth_token. It never runs `ray stop` (which would stop
# every Ray on the machine) and never kills by name.
#
# Loopback only: Ray replaces `--node-ip-address 127.0.0.1` by the machine's outward address and then
# binds GCS, raylet, object manager, workers, agents and metrics exporters to all interfaces. Ray's
# single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default off Linux) keeps the node address
# 127.0.0.1, and every one of those listeners then binds 127.0.0.1 (tests/test_infra.py checks each
# listening socket of the started processes). The price: no other node can join this head.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${LEARN_CLUSTER_DIR:-$ROOT/.cluster}"
case "$STATE" in /*) ;; *) STATE="$PWD/$STATE" ;; esac
VENV="${LEARN_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY="$VENV/bin/python"
HOST=127.0.0.1
TIMEOUT="${LEARN_CLUSTER_TIMEOUT:-180}"
STOP_TIMEOUT=30

RAY_PIDFILE="$STATE/ray.pid"
MLFLOW_PIDFILE="$STATE/mlflow.pid"
PORTS_FILE="$STATE/ports.env"
TOKEN_FILE="$STATE/auth_token"
LINK_FILE="$STATE/ray_temp_link"

die() { echo "cluster.sh: $*" >&2; exit 1; }

default_ports() {
  DASHBOARD_PORT="${LEARN_RAY_DASHBOARD_PORT:-8265}"
  GCS_PORT="${LEARN_RAY_GCS_PORT:-6379}"
  MLFLOW_PORT="${LEARN_MLFLOW_PORT:-5000}"
  CLIENT_PORT="${LEARN_RAY_CLIENT_PORT:-10001}"
  AGENT_PORT="${LEARN_RAY_AGENT_PORT:-52365}"
  AGENT_GRPC_PORT="${LEARN_RAY_AGENT_GRPC_PORT:-52366}"
  RUNTIME_ENV_PORT="${LEARN_RAY_RUNTIME_ENV_PORT:-52367}"
  METRICS_PORT="${LEARN_RAY_METRICS_PORT:-52368}"
  NODE_MANAGER_PORT="${LEARN_RAY_NODE_MANAGER_PORT:-52369}"
  OBJECT_MANAGER_PORT="${LEARN_RAY_OBJECT_MANAGER_PORT:-52370}"
}

# The ports a running cluster was started with win over the environment.
load_ports() {
  default_ports
  if [[ -f "$PORTS_FILE" ]]; then
    # shellcheck disable=SC1090
    source "$PORTS_FILE"
  fi
}

save_ports() {
  cat > "$PORTS_FILE" <<EOF
DASHBOARD_PORT=$DASHBOARD_PORT
GCS_PORT=$GCS_PORT
MLFLOW_PORT=$MLFLOW_PORT
CLIENT_PORT=$CLIENT_PORT
AGENT_PORT=$AGENT_PORT
AGENT_GRPC_PORT=$AGENT_GRPC_PORT
RUNTIME_ENV_PORT=$RUNTIME_ENV_PORT
METRICS_PORT=$METRICS_PORT
NODE_MANAGER_PORT=$NODE_MANAGER_PORT
OBJECT_MANAGER_PORT=$OBJECT_MANAGER_PORT
EOF
}

# Is the process group recorded in PIDFILE alive, and is it ours? The leader was started with setsid,
# so its PID is the group's ID; a leader that is still there must run the expected program (guards
# against a recycled PID).
group_alive() {
  local pidfile=$1 expect=$2 pid cmd
  [[ -f "$pidfile" ]] || return 1
  pid=$(cat "$pidfile")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 -- "-$pid" 2>/dev/null || return 1
  if cmd=$(ps -o command= -p "$pid" 2>/dev/null); then
    [[ "$cmd" == *"$expect"* ]] || return 1
  fi
  return 0
}

# run "$@" in a new session (own process group); exec keeps the PID
new_session() {
  if command -v setsid >/dev/null 2>&1; then
    exec setsid "$@"
  else  # e.g. macOS: the same through Python
    exec "$PY" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
  fi
}

# any HTTP answer counts (401 = up behind auth); optional bearer token
http_up() {
  "$PY" - "$1" "${2:-}" <<'EOF'
import sys, urllib.error, urllib.request
url, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
try:
    urllib.request.urlopen(req, timeout=2).close()
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
EOF
}

port_busy() {
  "$PY" - "$HOST" "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
EOF
}

# wait until URL answers while the group in PIDFILE lives
wait_http() {
  local what=$1 url=$2 pidfile=$3 expect=$4 log=$5 token=${6:-} deadline=$((SECONDS + TIMEOUT))
  until http_up "$url" "$token"; do
    if ! group_alive "$pidfile" "$expect"; then
      echo "cluster.sh: $what exited before answering on $url; last lines of $log:" >&2
      tail -n 40 "$log" >&2 || true
      return 1
    fi
    if (( SECONDS > deadline )); then
      echo "cluster.sh: $what did not answer on $url within ${TIMEOUT}s; last lines of $log:" >&2
      tail -n 40 "$log" >&2 || true
      return 1
    fi
    sleep 1
  done
}

stop_group() {
  local name=$1 pidfile=$2 expect=$3 pid deadline
  if [[ ! -f "$pidfile" ]]; then
    echo "$name: not running"
    return 0
  fi
  pid=$(cat "$pidfile")
  if ! group_alive "$pidfile" "$expect"; then
    echo "$name: not running (removing stale $pidfile)"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 -- "-$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
  if kill -0 -- "-$pid" 2>/dev/null; then
    echo "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL to process group $pid"
    kill -KILL -- "-$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while kill -0 -- "-$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
  fi
  if kill -0 -- "-$pid" 2>/dev/null; then
    echo "cluster.sh: $name: process group $pid survived SIGKILL; PID file kept" >&2
    return 1
  fi
  rm -f "$pidfile"
  echo "$name: stopped (process group $pid)"
}

# Ray puts Unix sockets under its temp dir; their paths must stay under 108 bytes, so a deep state
# dir is reached through a short symlink in /tmp (the files still live under the state dir).
ray_temp_dir() {
  local dir="$STATE/ray" link
  mkdir -p "$dir"
  if (( ${#dir} <= 40 )); then
    rm -f "$LINK_FILE"
    echo "$dir"
    return
  fi
  link="/tmp/learn-ray-$(printf '%s' "$dir" | cksum | cut -d' ' -f1)"
  ln -sfn "$dir" "$link"
  echo "$link" > "$LINK_FILE"
  echo "$link"
}

start_ray() {
  local temp_dir num_cpus=()
  temp_dir=$(ray_temp_dir)
  if [[ ! -s "$TOKEN_FILE" ]]; then
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
  fi
  chmod 600 "$TOKEN_FILE"
  if [[ -n "${LEARN_RAY_NUM_CPUS:-}" ]]; then num_cpus=(--num-cpus "$LEARN_RAY_NUM_CPUS"); fi
  # The head's environment reaches every job driver it starts: the venv's python first on PATH (job
  # entrypoints say `python ...`) and MLFLOW_TRACKING_URI pointing at the local MLflow server.
  # No drain on SIGTERM (Ray 2.60 waits up to 30 s by default; nothing to drain on a local head).
  (
    cd "$STATE"
    new_session env -u RAY_ADDRESS -u RAY_AUTH_TOKEN_PATH \
      PATH="$VENV/bin:$PATH" \
      RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat "$TOKEN_FILE")" \
      RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
      MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT" \
      "$VENV/bin/ray" start --head --block \
        --node-ip-address "$HOST" --port "$GCS_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
        --ray-client-server-port "$CLIENT_PORT" \
        --dashboard-agent-listen-port "$AGENT_PORT" --dashboard-agent-grpc-port "$AGENT_GRPC_PORT" \
        --runtime-env-agent-port "$RUNTIME_ENV_PORT" --metrics-export-port "$METRICS_PORT" \
        --node-manager-port "$NODE_MANAGER_PORT" --object-manager-port "$OBJECT_MANAGER_PORT" \
        ${num_cpus[@]+"${num_cpus[@]}"} \
        --temp-dir "$temp_dir" --disable-usage-stats
  ) > "$STATE/ray.log" 2>&1 < /dev/null &
  echo $! > "$RAY_PIDFILE"
}

start_mlflow() {
  mkdir -p "$STATE/artifacts"
  (
    cd "$STATE"
    new_session env -u MLFLOW_TRACKING_URI \
      "$VENV/bin/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" \
        --artifacts-destination "$STATE/artifacts" --serve-artifacts --workers 1
  ) > "$STATE/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$MLFLOW_PIDFILE"
}

check_session() {  # the recorded PID must come to lead its own process group (setsid is an exec away)
  local name=$1 pidfile=$2 pid pgid tries=50
  pid=$(cat "$pidfile")
  while (( tries-- > 0 )); do
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || true
    if [[ -z "$pgid" || "$pgid" == "$pid" ]]; then return 0; fi
    sleep 0.1
  done
  cmd_down >&2 || true
  die "$name (pid $pid) is in process group $pgid, not its own; stopped what was started"
}

print_usage_lines() {
  local venv_ray="$VENV/bin/ray"
  cat <<EOF

In the shell that submits (or: eval "\$($0 env)"):
  export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE    # or: export RAY_AUTH_TOKEN="\$(cat $TOKEN_FILE)"
  export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT

Submit the pipeline (from $ROOT; jobs on this head log to the MLflow server above):
  cd $ROOT && $venv_ray job submit --address http://$HOST:$DASHBOARD_PORT --working-dir . -- \\
      python flows/full_pipeline.py --config conf/default.yaml train.backend=ray

MLflow UI: http://$HOST:$MLFLOW_PORT    Ray dashboard: http://$HOST:$DASHBOARD_PORT (needs the token)
Stop: $0 down
EOF
}

print_env() {
  cat <<EOF
export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
EOF
}

cmd_up() {
  [[ -x "$VENV/bin/ray" && -x "$VENV/bin/mlflow" ]] || die "no ray/mlflow in $VENV (run: make setup)"
  mkdir -p "$STATE"
  # keep the state dir out of git without touching the repository's .gitignore
  [[ -f "$STATE/.gitignore" ]] || echo '*' > "$STATE/.gitignore"
  local ray_up=0 mlflow_up=0
  group_alive "$RAY_PIDFILE" ray && ray_up=1
  group_alive "$MLFLOW_PIDFILE" mlflow && mlflow_up=1
  if (( ray_up || mlflow_up )); then load_ports; else rm -f "$RAY_PIDFILE" "$MLFLOW_PIDFILE"; default_ports; fi
  if (( ray_up && mlflow_up )); then
    echo "Local cluster already up (state: $STATE)"
    echo "  Ray head     http://$HOST:$DASHBOARD_PORT  (process group $(cat "$RAY_PIDFILE"))"
    echo "  MLflow       http://$HOST:$MLFLOW_PORT  (process group $(cat "$MLFLOW_PIDFILE"))"
    print_usage_lines
    return 0
  fi
  if (( ! ray_up )); then
    rm -f "$RAY_PIDFILE"
    for p in "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT"; do
      if port_busy "$p"; then die "port $p on $HOST is taken by something else (set LEARN_RAY_*_PORT)"; fi
    done
  fi
  if (( ! mlflow_up )); then
    rm -f "$MLFLOW_PIDFILE"
    if port_busy "$MLFLOW_PORT"; then die "port $MLFLOW_PORT on $HOST is taken by something else (set LEARN_MLFLOW_PORT)"; fi
  fi
  save_ports
  if (( ! mlflow_up )); then start_mlflow; check_session mlflow "$MLFLOW_PIDFILE"; fi
  if (( ! ray_up )); then start_ray; check_session "ray head" "$RAY_PIDFILE"; fi
  local ok=1
  wait_http mlflow "http://$HOST:$MLFLOW_PORT/health" "$MLFLOW_PIDFILE" mlflow "$STATE/mlflow.log" || ok=0
  if (( ok )); then
    wait_http "ray head" "http://$HOST:$DASHBOARD_PORT/api/version" "$RAY_PIDFILE" ray "$STATE/ray.log" \
      "$(cat "$TOKEN_FILE")" || ok=0
  fi
  if (( ! ok )); then
    echo "cluster.sh: stopping what was started" >&2
    cmd_down >&2 || true
    exit 1
  fi
  echo "Local cluster up (state: $STATE)"
  echo "  Ray head     http://$HOST:$DASHBOARD_PORT  (process group $(cat "$RAY_PIDFILE"), log $STATE/ray.log)"
  echo "  MLflow       http://$HOST:$MLFLOW_PORT  (process group $(cat "$MLFLOW_PIDFILE"), log $STATE/mlflow.log)"
  print_usage_lines
}

cmd_down() {
  local rc=0
  stop_group "ray head" "$RAY_PIDFILE" ray || rc=1
  stop_group mlflow "$MLFLOW_PIDFILE" mlflow || rc=1
  if [[ -f "$LINK_FILE" ]]; then
    local link
    link=$(cat "$LINK_FILE")
    if [[ -L "$link" ]]; then rm -f "$link"; fi
    rm -f "$LINK_FILE"
  fi
  return $rc
}

cmd_status() {
  load_ports
  local up=0
  if group_alive "$RAY_PIDFILE" ray; then
    echo "ray head: running, process group $(cat "$RAY_PIDFILE"), dashboard http://$HOST:$DASHBOARD_PORT, GCS $HOST:$GCS_PORT"
    up=$((up + 1))
  else
    echo "ray head: not running"
  fi
  if group_alive "$MLFLOW_PIDFILE" mlflow; then
    echo "mlflow:   running, process group $(cat "$MLFLOW_PIDFILE"), http://$HOST:$MLFLOW_PORT"
    up=$((up + 1))
  else
    echo "mlflow:   not running"
  fi
  echo "state:    $STATE"
  (( up == 2 )) || return 3
}

cmd_env() {
  load_ports
  if ! group_alive "$RAY_PIDFILE" ray || ! group_alive "$MLFLOW_PIDFILE" mlflow; then
    die "not up (run: $0 up)"
  fi
  print_env
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
