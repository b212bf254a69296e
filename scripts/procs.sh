# shellcheck shell=bash
# Stop only processes this shell started: `stop_tree PID...` ends each process and all its
# descendants (TERM, then KILL after 5 s); `pids_using PATH` lists the processes whose command
# line names PATH (a folder only this run uses, e.g. its FLWR_HOME), which is how a process
# that detached from us (the local SuperLink `flwr run` starts) is still found as ours.

descendants() {  # PID -> PID and all its descendants, children first
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do descendants "$child"; done
  echo "$1"
}

pids_using() {  # never this shell or the subshell running this function
  pgrep -f -- "$1" 2>/dev/null | grep -vx -e "$$" -e "$BASHPID" || true
}

stop_tree() {
  local pids=() pid
  for pid in "$@"; do
    # shellcheck disable=SC2207
    pids+=($(descendants "$pid"))
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
