#!/usr/bin/env bash
# A one-node local Slurm cluster (munge + slurmctld + slurmd) for testing the sbatch launchers.
#
#   tools/slurm_local.sh [start]   # install (apt, only if missing) + start; waits until the node is idle
#   tools/slurm_local.sh stop      # stop only the daemons this script started (by their pid files)
#   tools/slurm_local.sh status    # exit 0 when the cluster answers and the node is up
#   tools/slurm_local.sh env       # prints `export SLURM_CONF=...` (eval it before sbatch/squeue)
#
# Needs root on Debian/Ubuntu (Slurm 22.05 + munge packages). The config lives in a private folder,
# not /etc/slurm, so clients need SLURM_CONF (`eval "$(tools/slurm_local.sh env)"`).
# Exit status 3 = prerequisites unavailable (not root, no apt-get, packages not installable): callers
# such as tests/test_slurm.py skip on 3 and fail on any other non-zero status.
#
# Environment: SLURM_LOCAL_DIR (default /tmp/r1mega-slurm), SLURM_LOCAL_CPUS (2),
# SLURM_LOCAL_CTLD_PORT (6817), SLURM_LOCAL_SLURMD_PORT (6818), SLURM_LOCAL_TIMEOUT (60, seconds to wait
# for the node).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/r1mega-slurm}
CPUS=${SLURM_LOCAL_CPUS:-2}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
WAIT_S=${SLURM_LOCAL_TIMEOUT:-60}
CONF=$DIR/etc/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "slurm_local: $*" >&2; }
unavailable() { log "unavailable: $*"; exit 3; }
die() { log "error: $*"; exit 1; }

# Alive and not a zombie (an exited daemon is reaped slowly here, so kill -0 alone is not enough).
alive() {
    local pid=$1 state
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)
    [[ $state != Z && $state != X ]]
}
pid_of() { [[ -s $1 ]] && tr -dc 0-9 <"$1" || true; }

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sbatch srun scontrol sinfo munged munge unmunge; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    [[ $(id -u) == 0 ]] || unavailable "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || unavailable "Slurm is not installed and there is no apt-get"
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    local apt_opts=(-o Acquire::Retries=1 -o Acquire::http::Timeout=30 -o DPkg::Lock::Timeout=60)
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurmctld slurmd slurm-client munge)
    # Try the cached package lists first (apt-get update is the slow part); update when that fails.
    if ! { apt-cache show "${pkgs[@]}" >/dev/null 2>&1 &&
        apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${pkgs[@]}" >&2; }; then
        apt-get "${apt_opts[@]}" update -qq >&2 || log "apt-get update failed; trying the cached package lists"
        apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${pkgs[@]}" >&2 ||
            unavailable "apt-get install ${pkgs[*]} failed"
    fi
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || unavailable "$cmd still missing after apt-get install"
    done
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi  # a munged is already running (ours or the system's): use it
    [[ -s /etc/munge/munge.key ]] || { command -v mungekey >/dev/null && mungekey --create >&2; }
    install -d -o munge -g munge -m 0755 /run/munge
    local force=()
    [[ -S /run/munge/munge.socket.2 ]] && force=(--force)  # stale socket of a killed munged
    runuser -u munge -- /usr/sbin/munged "${force[@]}" || die "munged failed to start"
    local i
    for i in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged started but munge -n | unmunge fails"
    pid_of /run/munge/munged.pid >"$DIR/run/munged.ours"  # stop kills munged only when we started it
}

write_conf() {
    local mem
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
    mem=$(( ${mem:-2000} * 9 / 10 ))
    mkdir -p "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
# written by tools/slurm_local.sh
ClusterName=r1mega-local
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=4
KillWait=30
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

node_ready() {
    local state
    state=$(timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1) || return 1
    [[ $state == idle* || $state == mix* || $state == alloc* ]] || return 1
    # after a restart the node can look idle from saved state before slurmd has registered
    timeout 10 scontrol show node "$HOST" 2>/dev/null | grep -q 'SlurmdStartTime=[0-9]'
}

start() {
    install_packages
    [[ $(id -u) == 0 ]] || unavailable "starting slurmctld/slurmd as configured here needs root"
    mkdir -p "$DIR/run"
    start_munge
    local ctld_pid slurmd_pid
    ctld_pid=$(pid_of "$DIR/run/slurmctld.pid")
    slurmd_pid=$(pid_of "$DIR/run/slurmd.pid")
    if alive "$ctld_pid" && alive "$slurmd_pid" && node_ready; then
        log "already running (slurmctld $ctld_pid, slurmd $slurmd_pid)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if ! alive "$ctld_pid"; then
        write_conf
        rm -rf "$DIR/state"  # fresh state: no stale node/job records (and ClusterName changes are safe)
        mkdir -p "$DIR/state" "$DIR/spool/slurmd"
        slurmctld -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    if ! alive "$slurmd_pid"; then
        mkdir -p "$DIR/spool/slurmd"
        slurmd -f "$CONF" || die "slurmd failed to start; see $DIR/log/slurmd.log"
    fi
    local t0=$SECONDS
    until node_ready; do
        if ((SECONDS - t0 > WAIT_S)); then
            tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
            die "node $HOST not idle after ${WAIT_S}s"
        fi
        sleep 0.5
    done
    log "cluster up: node $HOST, $CPUS CPUs, SLURM_CONF=$CONF ($((SECONDS - t0))s to idle)"
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait, then SIGKILL; only if the pid still runs NAME
    local name=$1 pid
    pid=$(pid_of "$2")
    if alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && { log "$name $pid ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
        log "stopped $name ($pid)"
    fi
    rm -f "$2"
}

stop() {
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    if [[ -s $DIR/run/munged.ours ]]; then
        stop_pid munged "$DIR/run/munged.ours"
    fi
}

status() {
    local ctld_pid slurmd_pid
    ctld_pid=$(pid_of "$DIR/run/slurmctld.pid")
    slurmd_pid=$(pid_of "$DIR/run/slurmd.pid")
    if alive "$ctld_pid" && alive "$slurmd_pid" && node_ready; then
        log "running (slurmctld $ctld_pid, slurmd $slurmd_pid)"
        return 0
    fi
    log "not running"
    return 1
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 [start|stop|status|env]" >&2; exit 2 ;;
esac
