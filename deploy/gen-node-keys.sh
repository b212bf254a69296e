#!/usr/bin/env bash
# Create the EC (NIST P-384) key pair that identifies a SuperNode to the SuperLink.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [-o OUT_DIR] NODE_NAME [NODE_NAME ...]

Creates, for each NODE_NAME, in OUT_DIR (default: ./keys):
  NODE_NAME      the private key (OpenSSH format): stays on the data owner's machine,
                 passed to \`flower-supernode --auth-supernode-private-key\`
  NODE_NAME.pub  the public key: sent to the SuperLink operator, who registers it with
                 \`flwr supernode register NODE_NAME.pub <connection>\`

Existing keys are never overwritten.
EOF
}

out_dir="keys"
while getopts "o:h" opt; do
  case "$opt" in
    o) out_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
command -v ssh-keygen >/dev/null || {
  echo "error: ssh-keygen not found (Debian/Ubuntu: apt-get install openssh-client)" >&2
  exit 1
}

mkdir -p "$out_dir"
for node in "$@"; do
  [[ "$node" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: bad NODE_NAME '$node'" >&2; exit 2; }
  key="$out_dir/$node"
  if [[ -e "$key" || -e "$key.pub" ]]; then
    echo "error: $key or $key.pub already exists; not overwriting" >&2
    exit 1
  fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedspallm-$node" -f "$key"
  chmod 600 "$key"
  echo "Created $key (private) and $key.pub (public)"
done
