# Sourced by scripts/testsite, testsite-gridengine and testsite-slurm2: whether a pid file names a daemon that runs.
#
# A pid file can outlive its daemon (a machine stopped without `down`, a daemon that crashed), and the kernel
# gives pids out again once they wrap around (pid_max is 32768 on many machines): a bare `kill -0` then sees
# an unrelated process as the daemon. `up` would skip starting it ("already running") and `down` would kill
# that process. A daemon writes its pid file after it starts, so the process the file names must have
# started before the file was written; one started later only has the same number.

# pid_alive PIDFILE: true if PIDFILE names a running process that started no later than the file was written.
pid_alive() {
  local pid rest started
  [ -f "$1" ] && pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null && rest=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  rest=${rest##*) }  # the fields after the command name, which may itself hold spaces or parentheses
  read -ra rest <<<"$rest"  # rest[19] is field 22 of proc(5): the start, in clock ticks after boot
  started=$(($(awk '/^btime /{print $2}' /proc/stat) + rest[19] / $(getconf CLK_TCK)))
  [ "$started" -le $(($(stat -c %Y "$1") + 2)) ]  # + 2: boot time and the file's time are whole seconds
}
