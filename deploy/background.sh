# shellcheck shell=bash
# Sourced by start-superlink.sh and start-supernode.sh for their `-b LOG_FILE` mode.

# start_in_background LOG READY WAIT CMD [ARGS...]
# Start CMD detached (nohup) with its command line and output in LOG, then return
# - when LOG shows the text READY: the PID on stdout, status 0;
# - when CMD exits first: one `error:` line on stderr (with Flower's reason from LOG) and CMD's
#   exit status (1 if it was 0), so scripts and service managers see the failure;
# - after WAIT seconds: the PID on stdout, a warning on stderr, status 0 (CMD is alive and keeps
#   trying, e.g. while its SuperLink is not up yet).
start_in_background() {
  local log="$1" ready="$2" wait_s="$3"
  shift 3
  { echo "+ $*" >"$log"; } 2>/dev/null || { echo "error: cannot write log '$log'" >&2; return 1; }
  nohup "$@" </dev/null >>"$log" 2>&1 &
  local pid=$! tick
  for ((tick = 0; tick < wait_s * 4; tick++)); do
    if grep -qF "$ready" "$log"; then
      echo "$pid"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      local status=0 why
      wait "$pid" || status=$?
      ((status != 0)) || status=1
      # Flower's reason, e.g. "Exit Code: 305 [code: 2004] Failed to activate SuperNode."
      why=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -oE 'Exit Code: [0-9]+|^\[code: [0-9]+\].*' |
        head -n 2 | paste -sd ' ' || true)
      [[ -n "$why" ]] || why=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -v '^\s*$' | tail -n 1 || true)
      echo "error: $(basename "$1") exited with status $status before it was ready:" \
        "$why (log: $log)" >&2
      return "$status"
    fi
    sleep 0.25
  done
  echo "$pid"
  echo "warning: $(basename "$1") (PID $pid) is not ready after $wait_s s;" \
    "it keeps trying (log: $log)" >&2
}
