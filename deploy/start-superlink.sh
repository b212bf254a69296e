#!/usr/bin/env bash
# Start a Flower SuperLink with TLS and SuperNode authentication.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [-c CERT_DIR] [-H HOST] [-p PORT] [-d DATABASE] [-l LOG_FILE]
       [-b LOG_FILE [-w SECONDS]] [--insecure] [-- EXTRA_FLOWER_SUPERLINK_ARGS...]

Starts \`flower-superlink\` (in the foreground, or with -b in the background) serving the
Fleet, Control and Runtime APIs on HOST:PORT over HTTPS, accepting only SuperNodes whose
public key was registered with \`flwr supernode register\`.

  -c CERT_DIR   holds ca.crt, server.pem, server.key from gen-certs.sh
                (default: ./certificates)
  -H HOST       address to listen on (default: 0.0.0.0, all interfaces)
  -p PORT       port (default: 9093)
  -d DATABASE   SQLite file for the SuperLink state; keeps registered SuperNodes and
                runs across restarts (default: ./superlink-state/state.db)
  -l LOG_FILE   also write the log to this (rotated) file
  -b LOG_FILE   run in the background with the output in LOG_FILE; return once it serves
                (its PID on stdout, status 0) or, if it exits first, with its exit status
                and one \`error:\` line on stderr
  -w SECONDS    with -b: wait at most this long for it to serve (default: 60)
  --insecure    NO TLS and NO SuperNode authentication. Only for tests on a single
                machine: refused unless HOST is a loopback address.

The ServerApp runs in a subprocess of the SuperLink (\`--isolation subprocess\`), so the
Python environment that runs this script must have the app's dependencies installed.
EOF
}

cert_dir="certificates"
host="0.0.0.0"
port="9093"
database="superlink-state/state.db"
log_file=""
background_log=""
wait_s=60
insecure=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -c) cert_dir="$2"; shift 2 ;;
    -H) host="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -d) database="$2"; shift 2 ;;
    -l) log_file="$2"; shift 2 ;;
    -b) background_log="$2"; shift 2 ;;
    -w) wait_s="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

[[ "$wait_s" =~ ^[0-9]+$ ]] || { echo "error: -w SECONDS must be an integer" >&2; exit 2; }
command -v flower-superlink >/dev/null || {
  echo "error: flower-superlink not found; activate the environment with flwr installed" >&2
  exit 1
}

args=(--host "$host" --port "$port" --database "$database" --isolation subprocess
      --disable-runtime-dependency-installation)
[[ -n "$log_file" ]] && args+=(--log-file "$log_file")

if [[ $insecure -eq 1 ]]; then
  case "$host" in
    127.*|localhost|::1) ;;
    *) echo "error: --insecure is only allowed on a loopback HOST (got '$host')" >&2; exit 2 ;;
  esac
  cat >&2 <<'EOF'
################################################################################
#  WARNING: INSECURE SUPERLINK -- NO TLS, NO SUPERNODE AUTHENTICATION           #
#  Traffic (model weights, run configs) is unencrypted and ANY process that can #
#  reach this port can join as a SuperNode. Use only for local loopback tests.  #
################################################################################
EOF
  args+=(--insecure)
else
  for f in ca.crt server.pem server.key; do
    [[ -r "$cert_dir/$f" ]] || {
      echo "error: $cert_dir/$f missing or unreadable (create it with gen-certs.sh)" >&2
      exit 1
    }
  done
  args+=(--ssl-ca-certfile "$cert_dir/ca.crt" --ssl-certfile "$cert_dir/server.pem"
         --ssl-keyfile "$cert_dir/server.key" --enable-supernode-auth)
fi

mkdir -p "$(dirname "$database")"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
if [[ -n "$background_log" ]]; then
  source "$(dirname "$0")/background.sh"
  start_in_background "$background_log" "Uvicorn running" "$wait_s" flower-superlink "${args[@]}" "$@"
  exit
fi
exec flower-superlink "${args[@]}" "$@"
