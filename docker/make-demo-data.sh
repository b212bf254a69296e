#!/usr/bin/env bash
# Split text into private calibration files for the compose demo's SuperNodes.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [-n NODES] [-o OUT_DIR] TEXT_FILE [TEXT_FILE ...]

Joins the TEXT_FILEs, keeps the last 10% of the lines as OUT_DIR/eval/eval.txt (the
SuperLink's held-out perplexity text) and cuts the rest into NODES contiguous shards,
OUT_DIR/node-<i>/calib.txt, one per SuperNode: each SuperNode sees only its own shard.
Defaults: NODES=3, OUT_DIR=demo-data next to this script (what compose.yml mounts).
Example (the WikiText-2 and PTB files of the tests):
  $(basename "$0") ../shared/data/wikitext2/wiki.valid.tokens ../shared/data/ptb/ptb.valid.txt
EOF
}

nodes=3
out_dir="$(dirname "$0")/demo-data"
while getopts "n:o:h" opt; do
  case "$opt" in
    n) nodes="$OPTARG" ;;
    o) out_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "error: NODES must be a positive integer" >&2; exit 2; }

work=$(mktemp)
trap 'rm -f "$work"' EXIT
cat "$@" | grep -v '^[[:space:]]*$' >"$work" || true
total=$(wc -l <"$work")
eval_lines=$((total / 10))
train_lines=$((total - eval_lines))
per_node=$((train_lines / nodes))
[[ $per_node -ge 1 && $eval_lines -ge 1 ]] || { echo "error: not enough text" >&2; exit 1; }

mkdir -p "$out_dir/eval"
tail -n "$eval_lines" "$work" >"$out_dir/eval/eval.txt"
for ((i = 1; i <= nodes; i++)); do
  mkdir -p "$out_dir/node-$i"
  sed -n "$(((i - 1) * per_node + 1)),$((i * per_node))p" "$work" >"$out_dir/node-$i/calib.txt"
  echo "$out_dir/node-$i/calib.txt: $per_node lines"
done
echo "$out_dir/eval/eval.txt: $eval_lines lines"
