# Sourced by the launch/run_*.sh recipes (not run by itself).

# run_launcher group|pid CMD...
#   Run the DeepSpeed launcher CMD in its own process group and pass SIGINT, SIGTERM, SIGUSR1 and SIGHUP on
#   to it, so that stopping this script (Ctrl-C, `kill PID`, scancel, a pod being deleted) stops every
#   process of the run. `group` signals the launcher's whole group (its launch.py and every rank):
#   DeepSpeed's runner forwards nothing by itself in single-node and --no_ssh mode, so a signal to
#   its pid alone would leave launch.py and the ranks running. `pid` signals the runner only (the
#   ssh/pdsh path, where the runner's own handler stops the remote ranks).
#   SIGTERM, SIGUSR1 and SIGHUP are preemption for the trainer: each rank finishes its step, writes a
#   checkpoint and exits 75. DeepSpeed's launcher itself dies at once on them, so with `group` this waits
#   for every process of the group (the ranks still saving) and then returns 75, which a job script can
#   requeue on.
#   DRY_RUN=1 prints CMD (shell-quoted, one line) instead of running it.
run_launcher() {
  local target=$1
  shift
  if [[ "${DRY_RUN:-0}" != 0 ]]; then
    printf '%q ' "$@"
    printf '\n'
    return 0
  fi
  local pid dest= rc=0 sig pending=()
  RUN_PREEMPTED=0
  # The traps come first: a signal between the launcher's start and its traps would take bash's default
  # action, ending this script and leaving the launcher's group running. One that comes before the
  # launcher's pid is known waits in `pending`.
  trap '_pass_on INT' INT
  trap 'RUN_PREEMPTED=1; _pass_on TERM' TERM HUP
  trap 'RUN_PREEMPTED=1; _pass_on USR1' USR1
  set -m                                   # job control on: the launcher gets its own process group
  "$@" </dev/null &
  pid=$!
  set +m
  dest=$pid
  [[ $target == group ]] && dest=-$pid
  for sig in ${pending[@]+"${pending[@]}"}; do
    kill -"$sig" -- "$dest" 2>/dev/null
  done
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break    # still alive: wait was cut short by a signal we passed on
  done
  if [[ $target == group ]]; then
    while kill -0 -- "-$pid" 2>/dev/null; do sleep 1; done   # ranks still finishing their step and checkpoint
  fi
  trap - INT TERM HUP USR1
  (( RUN_PREEMPTED )) && rc=75
  return "$rc"
}

# _pass_on SIG: run_launcher's traps: SIG to the launcher (its `dest`), or kept for when it has started.
_pass_on() {
  if [[ -n $dest ]]; then
    kill -"$1" -- "$dest" 2>/dev/null
  else
    pending+=("$1")
  fi
}

# launcher_cmd: the DeepSpeed launcher as an array (DEEPSPEED="python -m deepspeed.launcher.runner" etc.).
launcher_cmd() {
  read -r -a LAUNCHER <<< "${DEEPSPEED:-deepspeed}"
}
