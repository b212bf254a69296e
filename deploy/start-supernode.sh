#!/usr/bin/env bash
# Start a Flower SuperNode for one data owner: TLS to the SuperLink, EC-key
# authentication, and a node config naming the private calibration file.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") -s SUPERLINK_HOST:PORT -k PRIVATE_KEY -d DATA_PATH
       [-c CA_CERT] [-L MAX_LAYERS] [-m MEMORY_GB] [-p RUNTIME_PORT] [-n 'k=v ...']
       [-b LOG_FILE [-w SECONDS]] [--insecure] [-- EXTRA_FLOWER_SUPERNODE_ARGS...]

Starts \`flower-supernode\` (in the foreground, or with -b in the background). The ClientApp
runs in a subprocess of the SuperNode, so this environment must have the app's dependencies
installed. Arguments and files are checked first: a bad one is one \`error:\` line on stderr
and exit status 2 (usage) or 1 (missing file), and nothing is started.

  -s SUPERLINK     SuperLink address as host:port, e.g. superlink.example.org:9093
  -k PRIVATE_KEY   this node's private key from gen-node-keys.sh; its .pub must be
                   registered at the SuperLink (\`flwr supernode register\`)
  -d DATA_PATH     this node's private calibration file (.txt, .jsonl or .parquet);
                   it never leaves this machine
  -c CA_CERT       CA certificate that signed the SuperLink certificate
                   (default: ./certificates/ca.crt)
  -L MAX_LAYERS    most decoder layers this node prunes per round  (node config max-layers)
  -m MEMORY_GB     memory this node offers, in GB                   (node config memory-gb)
  -p RUNTIME_PORT  local port of the SuperNode's Runtime API (default: 9094); give each
                   SuperNode on the same machine its own
  -n 'k=v ...'     more node config entries, e.g. -n 'device="cuda:0"'
  -b LOG_FILE      run in the background with the output in LOG_FILE; return once the node
                   has joined the SuperLink (its PID on stdout, status 0) or, if it exits
                   first (e.g. key not registered), with its exit status and one \`error:\`
                   line on stderr
  -w SECONDS       with -b: wait at most this long for the node to join (default: 60); after
                   that, print its PID and a warning: it keeps retrying in the background
  --insecure       NO TLS and NO authentication. Only for tests on a single machine:
                   refused unless the SuperLink address is a loopback address.
EOF
}

superlink=""
key=""
data_path=""
ca_cert="certificates/ca.crt"
max_layers=""
memory_gb=""
runtime_port="9094"
extra_config=""
background_log=""
wait_s=60
insecure=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -s) superlink="$2"; shift 2 ;;
    -k) key="$2"; shift 2 ;;
    -d) data_path="$2"; shift 2 ;;
    -c) ca_cert="$2"; shift 2 ;;
    -L) max_layers="$2"; shift 2 ;;
    -m) memory_gb="$2"; shift 2 ;;
    -p) runtime_port="$2"; shift 2 ;;
    -n) extra_config="$2"; shift 2 ;;
    -b) background_log="$2"; shift 2 ;;
    -w) wait_s="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

[[ -n "$superlink" && -n "$data_path" ]] || { usage >&2; exit 2; }
[[ "$wait_s" =~ ^[0-9]+$ ]] || { echo "error: -w SECONDS must be an integer" >&2; exit 2; }
[[ -r "$data_path" ]] || { echo "error: calibration file '$data_path' not readable" >&2; exit 1; }
command -v flower-supernode >/dev/null || {
  echo "error: flower-supernode not found; activate the environment with flwr installed" >&2
  exit 1
}

data_path=$(realpath "$data_path")
[[ "$data_path" != *"'"* ]] || { echo "error: DATA_PATH must not contain a quote" >&2; exit 2; }
node_config="data-path='$data_path'"
if [[ -n "$max_layers" ]]; then
  [[ "$max_layers" =~ ^[0-9]+$ ]] || { echo "error: MAX_LAYERS must be an integer" >&2; exit 2; }
  node_config+=" max-layers=$max_layers"
fi
if [[ -n "$memory_gb" ]]; then
  [[ "$memory_gb" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "error: MEMORY_GB must be a number" >&2; exit 2; }
  [[ "$memory_gb" == *.* ]] || memory_gb="$memory_gb.0"
  node_config+=" memory-gb=$memory_gb"
fi
[[ -n "$extra_config" ]] && node_config+=" $extra_config"

args=(--superlink "$superlink" --port "$runtime_port" --isolation subprocess
      --node-config "$node_config")

if [[ $insecure -eq 1 ]]; then
  case "$superlink" in
    127.*|localhost:*|\[::1\]:*) ;;
    *) echo "error: --insecure is only allowed with a loopback SuperLink (got '$superlink')" >&2
       exit 2 ;;
  esac
  cat >&2 <<'EOF'
################################################################################
#  WARNING: INSECURE SUPERNODE -- NO TLS, NO AUTHENTICATION                     #
#  Model weights travel unencrypted. Use only for local loopback tests.         #
################################################################################
EOF
  args+=(--insecure)
else
  [[ -n "$key" ]] || { echo "error: -k PRIVATE_KEY is required (gen-node-keys.sh)" >&2; exit 2; }
  [[ -r "$key" ]] || { echo "error: private key '$key' not readable" >&2; exit 1; }
  [[ -r "$ca_cert" ]] || { echo "error: CA certificate '$ca_cert' not readable" >&2; exit 1; }
  args+=(--root-certificates "$ca_cert" --auth-supernode-private-key "$key")
fi

if [[ -n "$background_log" ]]; then
  source "$(dirname "$0")/background.sh"
  start_in_background "$background_log" "SuperNode ID:" "$wait_s" flower-supernode "${args[@]}" "$@"
  exit
fi
echo "Node config: $node_config" >&2
exec flower-supernode "${args[@]}" "$@"
