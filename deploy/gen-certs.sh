#!/usr/bin/env bash
# Create a private CA and a TLS server certificate for the Flower SuperLink.
#
# Flower 1.42 serves the Fleet, Control and Runtime APIs of the SuperLink on one
# HTTPS port, so one server certificate covers SuperNodes, the `flwr` CLI and the
# SuperExec. Clients (SuperNodes, `flwr`) only need the CA certificate: Flower uses
# server-side TLS; SuperNodes prove who they are with their EC key (gen-node-keys.sh).
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [-o OUT_DIR] [-n NAME] [-d DAYS] [HOST_OR_IP ...]

Creates, in OUT_DIR (default: ./certificates):
  ca.crt, ca.key        the private certificate authority (reused if both exist)
  NAME.pem, NAME.key    a server certificate signed by that CA (NAME default: server)

The certificate is valid for localhost, 127.0.0.1 and ::1 plus every HOST_OR_IP
given, e.g. the DNS name or public IP that SuperNodes use to reach the SuperLink:
  $(basename "$0") -o certificates superlink.example.org 203.0.113.7

Give ca.crt (never ca.key) to every SuperNode and to every \`flwr\` CLI user.
EOF
}

out_dir="certificates"
name="server"
days=365
while getopts "o:n:d:h" opt; do
  case "$opt" in
    o) out_dir="$OPTARG" ;;
    n) name="$OPTARG" ;;
    d) days="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

command -v openssl >/dev/null || { echo "error: openssl not found" >&2; exit 1; }
[[ "$days" =~ ^[0-9]+$ ]] || { echo "error: DAYS must be a number" >&2; exit 2; }
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: bad NAME '$name'" >&2; exit 2; }

sans=("DNS:localhost" "IP:127.0.0.1" "IP:::1")
for host in "$@"; do
  if [[ "$host" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$host" == *:* ]]; then
    sans+=("IP:$host")
  elif [[ "$host" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    sans+=("DNS:$host")
  else
    echo "error: '$host' is neither a host name nor an IP address" >&2
    exit 2
  fi
done
san_list=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out_dir"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ -f "$out_dir/ca.crt" && -f "$out_dir/ca.key" ]]; then
  echo "Reusing CA $out_dir/ca.crt"
else
  openssl ecparam -name secp384r1 -genkey -noout -out "$out_dir/ca.key"
  openssl req -x509 -new -sha384 -key "$out_dir/ca.key" -days "$days" \
    -subj "/CN=FedSpaLLM deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$out_dir/ca.crt"
  echo "Created CA $out_dir/ca.crt"
fi

cat >"$work/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$san_list
EOF
cn="${1:-localhost}"
openssl ecparam -name secp384r1 -genkey -noout -out "$out_dir/$name.key"
openssl req -new -sha384 -key "$out_dir/$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
openssl x509 -req -sha384 -in "$work/$name.csr" -CA "$out_dir/ca.crt" -CAkey "$out_dir/ca.key" \
  -CAcreateserial -CAserial "$work/ca.srl" -days "$days" -extfile "$work/ext.cnf" \
  -out "$out_dir/$name.pem"
chmod 644 "$out_dir/ca.crt" "$out_dir/$name.pem"
openssl verify -CAfile "$out_dir/ca.crt" "$out_dir/$name.pem" >/dev/null
echo "Created $out_dir/$name.pem (SANs: $san_list)"
