#!/usr/bin/env bash
# A two-node Ray cluster on loopback (two raylets on 127.0.0.1, each with its own ports and CPUS_PER_NODE CPUs),
# the way tests/test_cluster.py starts one, for running a study against a real cluster on one machine.
#
#   eval "$(benchmarks/ray_loopback.sh start [CPUS_PER_NODE])"   # exports RAY_ADDRESS and the token
#   OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py ... --ray-address "$RAY_ADDRESS"
#   benchmarks/ray_loopback.sh stop
#
# Its nodes live under their own temp dir ($OWL_RAY_TEMP, default /tmp/owlray-loopback) and `stop` stops only
# them (owl_deploy.cluster.stop_nodes), not every Ray on the machine as `ray stop --force` would.
# Token authentication as a real cluster has it: one fresh token for both nodes and the driver (Ray 2.60 turns
# token mode on by default once a local ray.init() ran; a driver without the token is refused).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
ray="$here/.venv/bin/ray"
py="$here/.venv/bin/python"
temp="${OWL_RAY_TEMP:-/tmp/owlray-loopback}"
[ -x "$ray" ] || { echo "error: $ray not found; run make setup first" >&2; exit 1; }

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

case "${1:-}" in
start)
  cpus="${2:-1}"
  [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || { echo "error: CPUS_PER_NODE must be a positive integer, got '$cpus'" >&2; exit 1; }
  export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
  RAY_AUTH_TOKEN="$("$py" -c 'from ray._private.authentication.authentication_token_generator import generate_new_authentication_token as g; print(g())')"
  export RAY_AUTH_TOKEN
  port="$(free_port)"
  common=(--node-ip-address=127.0.0.1 "--num-cpus=$cpus" --disable-usage-stats)
  "$ray" start --head "--port=$port" --include-dashboard=false "--temp-dir=$temp" "${common[@]}" \
    "--dashboard-agent-listen-port=$(free_port)" "--metrics-export-port=$(free_port)" >&2
  "$ray" start "--address=127.0.0.1:$port" "${common[@]}" \
    "--dashboard-agent-listen-port=$(free_port)" "--metrics-export-port=$(free_port)" >&2
  echo "export RAY_ADDRESS=127.0.0.1:$port RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN RAY_USAGE_STATS_ENABLED=0"
  ;;
stop)
  "$py" -c "import sys; from owl_deploy.cluster import stop_nodes; print(f'stopped {stop_nodes(sys.argv[1])} processes', file=sys.stderr)" "$temp"
  ;;
*)
  echo "usage: $0 start [CPUS_PER_NODE] | stop" >&2
  exit 2
  ;;
esac
