# Sourced by scripts/testsite, testsite-gridengine and testsite-slurm2: whether a pid file names a daemon that runs.
#
# A pid file can outlive its daemon (a machine stopped without `down`, a daemon that crashed), and the kernel
# gives pids out again once they wrap around (pid_max is 32768 on many machines): a bare `kill -0` then sees
# an unrelated process as the daemon. `up` would skip starting it ("already running") and `down` would kill
# that process. So the process must also be one of the site's daemons, by its program's name. (Its start time
# against the file's would be finer, but this VM's boot-time and wall clocks drift apart by tens of seconds.)
SITE_DAEMONS=" sshd munged mariadbd slurmdbd slurmctld slurmd docker-registry sge_qmaster sge_execd "

# pid_alive PIDFILE: true if PIDFILE names a running process that is one of the site's daemons.
pid_alive() {
  local pid name
  [ -f "$1" ] && pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null && name=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $SITE_DAEMONS == *" $name "* ]]
}
