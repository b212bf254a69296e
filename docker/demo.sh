#!/usr/bin/env bash
# The compose demo in one command: demo data, image, SuperLink + 3 SuperNodes, one run,
# checked results on the host, everything stopped and removed again.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

usage() {
  cat <<EOF
Usage: $(basename "$0") [--tls] [--no-build] [--keep] [-c CA_FILE] [-w WHEEL_DIR]
                        [-a NAME=VALUE] [-r RUN_CONFIG] [-o OUT_DIR] [TEXT_FILE ...]

1. cuts TEXT_FILEs into docker/demo-data/ (three private calibration files and a held-out
   eval.txt, docker/make-demo-data.sh) unless docker/demo-data/node-1/calib.txt exists;
   default TEXT_FILEs: the WikiText-2 and PTB validation files under \$FEDSPALLM_DATA
   (default ../shared/data);
2. builds the image \${FEDSPALLM_IMAGE:-fedspallm:cpu} with BuildKit (skipped by --no-build);
3. starts docker/compose.yml (+ compose.with-tls.yml with --tls): a SuperLink and three
   SuperNodes, each with its calibration folder mounted read-only;
4. submits one run from the one-shot \`flwr-run\` service and streams it;
5. checks OUT_DIR/fedspallm-<run id>/ on the host (default docker/outputs): the pruned
   model, report.json (complete, finite perplexities) and the plots;
6. \`compose down -v\` (unless --keep) and checks that no container of the demo is left.
Exits non-zero if any step fails.

Options:
  --tls           TLS and SuperNode authentication (compose.with-tls.yml)
  --no-build      use the existing image
  --keep          leave the containers running (stop them with compose down -v)
  -c CA_FILE      CA bundle for pip during the build (a BuildKit secret: a TLS-intercepting
                  proxy's CA, e.g. /etc/ssl/certs/ca-certificates.crt); not in the image
  -w WHEEL_DIR    hard-link (or copy) the wheels of WHEEL_DIR into docker/wheels/ and take
                  torch from there and PyPI (TORCH_INDEX_URL=) instead of the PyTorch index
  -a NAME=VALUE   a build argument (repeatable), e.g. -a CPU_BASE_IMAGE=local/debian:bookworm
  -r RUN_CONFIG   the run's --run-config (default: $(default_run_config))
  -o OUT_DIR      where the runs land on the host (default docker/outputs)
Environment: DOCKER (the docker CLI used for the build, default docker; it needs BuildKit:
the buildx plugin, or Docker 20.10's own CLI), FEDSPALLM_IMAGE.
EOF
}

# A small run so that the demo takes minutes on a few CPU cores: the real embedded
# SmolLM2-135M, the paper's one-pass method (no refine phase), 8 calibration windows of 128
# tokens per node and 8 evaluation windows.
default_run_config() {
  echo "min-nodes=3 method='fedspallm-paper' nsamples=8 seqlen=128 eval-max-windows=8" \
    "out-dir='/outputs' eval-data='/eval/eval.txt'"
}

tls=0 build=1 keep=0 ca_file="" wheel_dir="" run_config="" out_dir="$here/outputs"
build_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tls) tls=1 ;;
    --no-build) build=0 ;;
    --keep) keep=1 ;;
    -c) ca_file="$2"; shift ;;
    -w) wheel_dir="$2"; shift ;;
    -a) build_args+=(--build-arg "$2"); shift ;;
    -r) run_config="$2"; shift ;;
    -o) out_dir="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
run_config="${run_config:-$(default_run_config)}"

fail() { echo "demo: error: $*" >&2; exit 1; }
step() { echo "demo: $* ($(date -u +%H:%M:%S))" >&2; }

DOCKER="${DOCKER:-docker}"
image="${FEDSPALLM_IMAGE:-fedspallm:cpu}"
command -v "$DOCKER" >/dev/null || fail "docker CLI '$DOCKER' not found"
"$DOCKER" info >/dev/null 2>&1 || fail "no Docker engine answers ('$DOCKER info' fails)"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  fail "neither 'docker compose' (v2) nor 'docker-compose' (v1) is installed"
fi
files=(-f "$here/compose.yml")
[[ $tls -eq 1 ]] && files+=(-f "$here/compose.with-tls.yml")
project=fedspallm-demo
# COMPOSE_HTTP_TIMEOUT (v1): creating a container of a 2.5 GB image takes minutes with the vfs
# storage driver.
dc() { FEDSPALLM_IMAGE="$image" OUTPUTS_DIR="$out_dir" RUN_CONFIG="$run_config" \
  COMPOSE_HTTP_TIMEOUT="${COMPOSE_HTTP_TIMEOUT:-900}" "${compose[@]}" -p "$project" "${files[@]}" "$@"; }

# 1. data
if [[ ! -f "$here/demo-data/node-1/calib.txt" ]]; then
  data="${FEDSPALLM_DATA:-$repo/../shared/data}"
  [[ $# -gt 0 ]] || set -- "$data/wikitext2/wiki.valid.tokens" "$data/ptb/ptb.valid.txt"
  for f in "$@"; do [[ -r "$f" ]] || fail "text file '$f' not readable (give TEXT_FILEs)"; done
  step "cutting demo data from $*"
  "$here/make-demo-data.sh" "$@" >&2
fi

start=$(date +%s)
# 2. image
if [[ $build -eq 1 ]]; then
  if [[ -n "$wheel_dir" ]]; then
    [[ -d "$wheel_dir" ]] || fail "wheel folder '$wheel_dir' not found"
    for w in "$wheel_dir"/*.whl; do
      [[ -e "$w" ]] || fail "no *.whl in '$wheel_dir'"
      [[ -e "$here/wheels/$(basename "$w")" ]] || ln "$w" "$here/wheels/" 2>/dev/null \
        || cp "$w" "$here/wheels/"
    done
    build_args+=(--build-arg TORCH_INDEX_URL=)
  fi
  secret=()
  if [[ -n "$ca_file" ]]; then
    [[ -r "$ca_file" ]] || fail "CA file '$ca_file' not readable"
    secret=(--secret "id=pip-ca,src=$ca_file")
  fi
  step "building $image"
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host -f "$here/Dockerfile" -t "$image" \
    "${secret[@]}" "${build_args[@]}" "$repo" || fail "image build failed (BuildKit needed: see DOCKER in -h)"
fi
built=$(date +%s)

# 3. up; from here on, always take the demo down again
mkdir -p "$out_dir"
if [[ $(id -u) -eq 0 ]]; then chown 49999:49999 "$out_dir"; else chmod a+rwx "$out_dir"; fi
before=$(ls -d "$out_dir"/fedspallm-* 2>/dev/null || true)
down() {
  local rc=$?
  if [[ $keep -eq 0 ]]; then
    step "compose down"
    dc down -v --remove-orphans >&2 || rc=1
    left=$("$DOCKER" ps -a -q --filter "label=com.docker.compose.project=$project")
    [[ -z "$left" ]] || { echo "demo: error: containers left: $left" >&2; rc=1; }
  fi
  exit "$rc"
}
trap down EXIT
step "compose up"
dc up -d --no-build >&2

# 4. run
step "flwr run --run-config \"$run_config\""
dc run --rm --no-deps flwr-run || fail "flwr run failed"  # the rest is up already
ran=$(date +%s)

# 5. check the outputs on the host
run_dir=$(comm -13 <(echo "$before") <(ls -d "$out_dir"/fedspallm-* 2>/dev/null) | tail -n 1)
[[ -n "$run_dir" ]] || fail "no new fedspallm-<run id>/ in $out_dir"
for f in report.json model/config.json perplexity.png; do
  [[ -s "$run_dir/$f" ]] || fail "$run_dir/$f missing"
done
# read the report in the running SuperLink container (its Python; no new container)
dc exec -T superlink python - "/outputs/$(basename "$run_dir")/report.json" <<'EOF' \
  || fail "report check failed: $run_dir/report.json"
import json, math, sys
r = json.load(open(sys.argv[1]))
ppl = r["perplexity"]
values = [v for part in ("dense", "pruned") for v in (ppl.get(part) or {}).values()]
print(f"demo: {len(r['rounds'])} round(s), {len(r['nodes'])} nodes, sparsity "
      f"{r['sparsity']['overall']:.3f}, bytes up {r['bytes']['total_up']:,} down "
      f"{r['bytes']['total_down']:,}, perplexity dense {ppl.get('dense')} pruned {ppl['pruned']}")
if not r["complete"] or not values or not all(math.isfinite(v) for v in values):
    sys.exit("incomplete run or non-finite perplexity")
EOF
echo "demo: outputs in $run_dir: $(cd "$run_dir" && echo *)"
echo "demo: wall time build $((built - start)) s, up + run $((ran - built)) s"
