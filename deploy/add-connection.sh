#!/usr/bin/env bash
# Add a SuperLink connection to the Flower CLI configuration ($FLWR_HOME/config.toml).
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") NAME HOST:PORT CA_CERT
       $(basename "$0") --insecure NAME 127.0.0.1:PORT

Appends to \$FLWR_HOME/config.toml (default ~/.flwr/config.toml):
  [superlink.NAME]
  address = "HOST:PORT"
  root-certificates = "<absolute path of CA_CERT>"
after which \`flwr run . NAME\`, \`flwr supernode register KEY.pub NAME\`,
\`flwr ls NAME\` and \`flwr log RUN_ID NAME\` talk to that SuperLink over TLS.
--insecure writes \`insecure = true\` instead (loopback test SuperLinks only).
EOF
}

insecure=0
if [[ "${1:-}" == "--insecure" ]]; then insecure=1; shift; fi
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
[[ $# -eq $((3 - insecure)) ]] || { usage >&2; exit 2; }
command -v flwr >/dev/null || { echo "error: flwr not found" >&2; exit 1; }

name="$1"
address="$2"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "error: bad connection NAME '$name'" >&2; exit 2; }
[[ "$address" =~ ^[^\ \"]+:[0-9]+$ ]] || { echo "error: address must be HOST:PORT" >&2; exit 2; }

flwr config ls >/dev/null  # creates the default config.toml if there is none yet
config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
if grep -qE "^\[superlink\.$name\]" "$config"; then
  echo "error: connection '$name' already exists in $config" >&2
  exit 1
fi

if [[ $insecure -eq 1 ]]; then
  case "$address" in
    127.*|localhost:*) ;;
    *) echo "error: --insecure is only allowed for a loopback address" >&2; exit 2 ;;
  esac
  echo "WARNING: connection '$name' is INSECURE (no TLS): loopback tests only" >&2
  entry="insecure = true"
else
  [[ -r "$3" ]] || { echo "error: CA certificate '$3' not readable" >&2; exit 1; }
  ca=$(realpath "$3")
  [[ "$ca" != *'"'* ]] || { echo "error: CA_CERT path must not contain a quote" >&2; exit 2; }
  entry="root-certificates = \"$ca\""
fi

printf '\n[superlink.%s]\naddress = "%s"\n%s\n' "$name" "$address" "$entry" >>"$config"
echo "Added SuperLink connection '$name' ($address) to $config"
