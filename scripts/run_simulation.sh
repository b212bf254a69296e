#!/usr/bin/env bash
# Run the Flower app in the local Ray simulation: `scripts/run_simulation.sh [flwr run args...]`.
# Registers a `fedspallm-sim` connection (a local SuperLink) in $FLWR_HOME/config.toml, runs the
# app on NUM_SUPERNODES (4) simulated SuperNodes with CPUS_PER_CLIENT (2) and GPUS_PER_CLIENT
# (0.0) each (`--federation-config`), streams the run's logs, and stops the local SuperLink that
# `flwr run` starts, unless one was already running before.
set -euo pipefail
cd "$(dirname "$0")/.."
FLWR="${FLWR:-$(command -v flwr || echo "$PWD/.venv/bin/flwr")}"
# `flwr run` starts `flower-superlink` by name: it must be on PATH even without an active venv
export PATH="$(dirname "$FLWR"):$PATH"
export FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}"
NUM_SUPERNODES="${NUM_SUPERNODES:-4}"
CPUS_PER_CLIENT="${CPUS_PER_CLIENT:-2}"
GPUS_PER_CLIENT="${GPUS_PER_CLIENT:-0.0}"
CONN="fedspallm-sim"
mkdir -p "$FLWR_HOME"
config="$FLWR_HOME/config.toml"
[ -f "$config" ] || printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' >"$config"
grep -q "^\[superlink.$CONN\]" "$config" || printf '\n[superlink.%s]\naddress = ":local:"\n' "$CONN" >>"$config"
# the simulation's size and resources travel with each run (Flower 1.42's federation config)
federation="num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CPUS_PER_CLIENT"
federation="$federation client-resources-num-gpus=$GPUS_PER_CLIENT"
# the corpora: a local folder when FEDSPALLM_DATA names one (passed on as data-dir, since an
# already running local SuperLink keeps the environment it started with), else the HF Hub
data_config=()
[ -z "${FEDSPALLM_DATA:-}" ] || data_config=(--run-config "data-dir='$(realpath -m "$FEDSPALLM_DATA")'")
# shellcheck source=scripts/procs.sh
. scripts/procs.sh
# `flwr run` starts a detached local SuperLink (logging under $FLWR_HOME) unless one is up:
# stop it afterwards, with its simulation and Ray processes, but never one we did not start
port="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}"
had_superlink=$(curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/health" && echo 1 || echo 0)
stop_superlink() {
  [ "$had_superlink" = 0 ] || return 0
  # shellcheck disable=SC2046
  stop_tree $(pids_using "$FLWR_HOME/local-superlink/")
}
trap stop_superlink EXIT
trap 'exit 130' INT TERM
# the local SuperLink installs nothing: this environment already holds every dependency
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}"
# every client's progress line as it is (Ray folds similar lines into "[repeated Nx]"), and
# Ray's notice about accelerator variables of CPU-only actors off
export RAY_DEDUP_LOGS="${RAY_DEDUP_LOGS:-0}" RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="${RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO:-0}"
log=$(mktemp)
# each client computes on as many torch threads as it has CPUs, whatever OMP_NUM_THREADS says
# (float sums depend on the count: the same settings give the same bits on every run)
"$FLWR" run . "$CONN" --stream --federation-config "$federation" "${data_config[@]}" \
  --run-config "out-dir='$PWD/runs' threads=$CPUS_PER_CLIENT" "$@" 2>&1 |
  tee "$log"
# `flwr run --stream` exits 0 even when the run failed: ask the SuperLink how it ended
run_id=$(grep -o 'Successfully started run [0-9]*' "$log" | grep -o '[0-9]*$' || true)
rm -f "$log"
[ -n "$run_id" ] || { echo "run_simulation: the run did not start" >&2; exit 1; }
status=$("$FLWR" ls "$CONN" --run-id "$run_id" --format json | grep -o '"status": *"[^"]*"' || true)
case "$status" in
  *finished:completed*) echo "run_simulation: run $run_id completed" ;;
  *) echo "run_simulation: run $run_id did not complete ($status)" >&2; exit 1 ;;
esac
