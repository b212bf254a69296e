#!/usr/bin/env bash
# Register SuperNode public keys at a SuperLink (run by the SuperLink operator).
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") CONNECTION PUBLIC_KEY.pub [PUBLIC_KEY.pub ...]

Registers each public key (from gen-node-keys.sh) with
  flwr supernode register PUBLIC_KEY.pub CONNECTION --name <file name without .pub>
CONNECTION is a SuperLink connection in \$FLWR_HOME/config.toml (default ~/.flwr),
e.g. one added with add-connection.sh. Keys that are already registered are skipped,
so the script can be re-run. Only SuperNodes holding a registered key can join.
EOF
}

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
command -v flwr >/dev/null || { echo "error: flwr not found" >&2; exit 1; }

connection="$1"
shift
for pub in "$@"; do
  name=$(basename "$pub" .pub)
  if out=$(flwr supernode register "$pub" "$connection" --name "$name" 2>&1); then
    echo "$out" | grep -F "registered" || true
  elif grep -qF "already in use" <<<"$out"; then
    echo "SuperNode key $pub is already registered"
  else
    echo "$out" >&2
    echo "error: could not register $pub" >&2
    exit 1
  fi
done
