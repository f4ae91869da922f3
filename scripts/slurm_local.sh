#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on localhost, for tests that submit sbatch scripts.
#
#   scripts/slurm_local.sh start  DIR   install slurm-wlm + munge if missing (apt-get, root),
#                                       write DIR/slurm.conf, start a private munged,
#                                       slurmctld and slurmd, wait for the node to be idle,
#                                       record the pids in DIR/pids
#   scripts/slurm_local.sh stop   DIR   cancel the cluster's jobs, then kill exactly the pids
#                                       recorded in DIR/pids; then any leftover slurmstepd of
#                                       this cluster (holding DIR/log/slurmd.log open) and job
#                                       processes (SLURM_JOB_ID + SLURM_CONF=DIR/slurm.conf in
#                                       their environment) that escaped slurm's own kill
#   scripts/slurm_local.sh status DIR   pids, sinfo and squeue of that cluster
#   scripts/slurm_local.sh env    DIR   prints "export SLURM_CONF=DIR/slurm.conf"
#
# Nothing global is written: every file (config, munge key + socket, state, spool, logs,
# job-completion log) lives under DIR and every command is pointed at DIR/slurm.conf
# through SLURM_CONF (Debian's default would be /etc/slurm/slurm.conf).  The only global
# effect is the apt-get install itself; while it runs, a temporary /usr/sbin/policy-rc.d
# (only if none exists) stops the packages' postinst from starting system daemons.
# Use the cluster with:   export SLURM_CONF=DIR/slurm.conf; sbatch ...; squeue; scontrol ...
# There is no slurmdbd, so sacct does not work: use `scontrol show job -o ID` (records kept
# MinJobAge=3600 s) or DIR/jobcomp.txt (jobcomp/filetxt, one line per finished job run).
#
# Settings (environment): SLURM_LOCAL_CPUS (2), SLURM_LOCAL_MEM_MB (90% of MemTotal, at most
# MemTotal-512), SLURM_LOCAL_CTLD_PORT / SLURM_LOCAL_SLURMD_PORT (first free from 6817 / 6818),
# SLURM_LOCAL_CLUSTER (localtest), SLURM_LOCAL_START_TIMEOUT (60 s),
# SLURM_LOCAL_PROCTRACK (linuxproc; "pgid" also kills a job's orphaned background processes),
# SLURM_LOCAL_CRED_EXPIRE (10 s; >= 5; also the delay before a requeued job may restart),
# SLURM_LOCAL_NO_INSTALL=1 (never run apt-get; missing slurm is then "unavailable").
#
# Exit status: 0 ok, 1 failure, 2 usage, 3 slurm unavailable here (not root, no apt-get,
# install failed, no binaries) -- callers may treat 3 as "skip".
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"
PROG=$(basename "$0")

die() { echo "$PROG: error: $*" >&2; exit 1; }
unavailable() { echo "$PROG: slurm unavailable: $*" >&2; exit 3; }
log() { echo "$PROG: $*" >&2; }

usage() {
    echo "usage: $PROG {start|stop|status|env} DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
CMD=$1
[ -n "$2" ] || usage
case "$2" in *[[:space:]]*) die "DIR must not contain whitespace (slurm.conf cannot quote it): '$2'";; esac
if [ "$CMD" = start ]; then mkdir -p "$2" || die "cannot create $2"; fi
[ -d "$2" ] || die "no such directory: $2"
DIR=$(cd "$2" && pwd -P)
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2

# ---------------------------------------------------------------- helpers
comm_of() { cat "/proc/$1/comm" 2>/dev/null || true; }

# alive_as PID NAME: the pid exists, is not a zombie, and is (still) the program NAME
alive_as() {
    [ -n "$1" ] && [ "$(comm_of "$1")" = "$2" ] || return 1
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ]
}

recorded_pid() { [ -f "$PIDS" ] && awk -v n="$1" '$1 == n { p = $2 } END { if (p) print p }' "$PIDS"; return 0; }

port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        ss -Hltn "( sport = :$1 )" 2>/dev/null | grep -q . && return 0
        return 1
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {   # free_port FIRST [EXCLUDE]
    local p=$1
    while [ "$p" -lt $(($1 + 200)) ]; do
        if [ "$p" != "${2:-}" ] && ! port_in_use "$p"; then echo "$p"; return 0; fi
        p=$((p + 1))
    done
    return 1
}

# kill_pid PID NAME [any]: TERM, wait up to 15 s, then KILL; only if PID is still NAME
# ("any": a child this start just launched, which may not have exec'd NAME yet)
kill_pid() {
    local pid=$1 name=$2
    [ -n "$pid" ] || return 0
    if [ "${3:-}" = any ] && kill -0 "$pid" 2>/dev/null; then name=$(comm_of "$pid"); fi
    alive_as "$pid" "$name" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        alive_as "$pid" "$name" || { log "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
}

# slurmstepd processes left behind by this cluster's slurmd (they outlive a killed slurmd):
# recognised by the open DIR/log/slurmd.log they inherited
our_stepds() {
    local d pid fd
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [ "$(comm_of "$pid")" = slurmstepd ] || continue
        for fd in "$d"/fd/*; do
            if [ "$(readlink "$fd" 2>/dev/null)" = "$DIR/log/slurmd.log" ]; then echo "$pid"; break; fi
        done
    done
    return 0
}

# descendants PID: all processes below PID (the job's processes under a slurmstepd)
descendants() {
    ps -eo pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END { for (p in parent) { q = p; while (q in parent && q != root && q > 1) q = parent[q]; if (q == root && p != root) print p } }'
}

show_logs() {
    local f
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log \
             "$DIR"/log/slurmctld.out "$DIR"/log/slurmd.out "$DIR"/log/munged.out; do
        [ -s "$f" ] || continue
        echo "---- last lines of $f" >&2
        tail -n 15 "$f" >&2
    done
}

cluster_cmd() { SLURM_CONF=$CONF "$@"; }

# ---------------------------------------------------------------- install
ensure_installed() {
    if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
        return 0
    fi
    [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && unavailable "slurmctld/slurmd/munged not installed and SLURM_LOCAL_NO_INSTALL=1"
    [ "$(id -u)" = 0 ] || unavailable "slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null 2>&1 || unavailable "slurm is not installed and there is no apt-get"
    mkdir -p "$DIR/log"
    log "installing slurm-wlm and munge with apt-get (log: $DIR/log/apt.log) ..."
    local policy_added=0 rc=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # keep the packages' postinst from starting system-wide munged/slurmctld/slurmd
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get -q -o DPkg::Lock::Timeout=300 update &&
        apt-get -q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
            -o Dpkg::Options::=--force-confold install --no-install-recommends slurm-wlm munge
    } > "$DIR/log/apt.log" 2>&1 || rc=$?
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    if [ "$rc" != 0 ]; then
        tail -n 20 "$DIR/log/apt.log" >&2
        unavailable "apt-get install slurm-wlm munge failed (exit $rc), see $DIR/log/apt.log"
    fi
    if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
        unavailable "apt-get succeeded but slurmctld/munged are still missing"
    fi
    log "installed: $(slurmctld -V 2>/dev/null || echo slurm)"
}

# ---------------------------------------------------------------- config
write_conf() {
    local cpus=${SLURM_LOCAL_CPUS:-2} cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10} mem total ctld_port slurmd_port
    total=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    mem=${SLURM_LOCAL_MEM_MB:-$(( total * 9 / 10 < total - 512 ? total * 9 / 10 : total - 512 ))}
    [ "$mem" -ge 100 ] 2>/dev/null || mem=100
    ctld_port=${SLURM_LOCAL_CTLD_PORT:-$(free_port 6817)} || die "no free port for slurmctld"
    slurmd_port=${SLURM_LOCAL_SLURMD_PORT:-$(free_port $((ctld_port + 1)) "$ctld_port")} || die "no free port for slurmd"
    cat > "$CONF" <<EOF
# Single-node test cluster written by scripts/slurm_local.sh; use with SLURM_CONF=$CONF
ClusterName=${SLURM_LOCAL_CLUSTER:-localtest}
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged (key and socket under DIR), not the system one.  cred_expire (default 120 s)
# is also how long a requeued job waits before it may start again (its BeginTime)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$cred_expire
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd.%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups needed (containers/VMs without a delegated cgroup tree)
ProctrackType=proctrack/${SLURM_LOCAL_PROCTRACK:-linuxproc}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# scheduling passes every second (default 60 s / 30 s): requeued jobs restart promptly
SchedulerParameters=sched_interval=1,bf_interval=1
# no slurmdbd: sacct does not work; finished runs are logged to JobCompLoc
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
# keep finished jobs visible to "scontrol show job" for an hour
MinJobAge=3600
ReturnToService=2
JobRequeue=1
# a node whose hardware differs from the lines below still registers with these values
SlurmdParameters=config_overrides
KillWait=5
InactiveLimit=0
Waittime=0
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

# ---------------------------------------------------------------- daemons
start_munged() {
    local key=$MUNGE_DIR/munge.key
    # munged wants the socket directory searchable by everyone (0711 like /var/lib/munge);
    # --force downgrades that check to a warning when DIR sits under a 0700 parent (pytest tmp)
    mkdir -p "$MUNGE_DIR" && chmod 711 "$MUNGE_DIR"
    if [ ! -s "$key" ]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$key" >/dev/null 2>&1 || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        else
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
        log "created munge key $key"
    fi
    chmod 400 "$key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    setsid munged --foreground --force --key-file="$key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/run/munged.pid" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        > "$DIR/log/munged.out" 2>&1 < /dev/null &
    echo "munged $!" >> "$PIDS"
    for _ in $(seq 1 100); do
        if [ -S "$MUNGE_SOCKET" ] && munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$(recorded_pid munged)" 2>/dev/null || break
        sleep 0.1
    done
    show_logs
    cleanup_started
    die "munged did not come up (socket $MUNGE_SOCKET)"
}

start_daemon() {   # start_daemon NAME ARGS...
    local name=$1; shift
    setsid "$name" "$@" > "$DIR/log/$name.out" 2>&1 < /dev/null &
    echo "$name $!" >> "$PIDS"
}

# after start: the recorded pid must now be the daemon itself (else take its pid file)
check_recorded() {   # check_recorded NAME PIDFILE
    local pid
    pid=$(recorded_pid "$1")
    alive_as "$pid" "$1" && return 0
    pid=$(cat "$2" 2>/dev/null || true)
    alive_as "$pid" "$1" || fail_start "$1 is not running after start"
    log "$1 runs as pid $pid (from $2)"
    echo "$1 $pid" >> "$PIDS"
}

cleanup_started() {   # kill whatever this start recorded
    local name
    for name in slurmd slurmctld munged; do kill_pid "$(recorded_pid "$name")" "$name" any; done
    rm -f "$PIDS"
}

fail_start() {
    show_logs
    cleanup_started
    die "$*"
}

running_all() {
    alive_as "$(recorded_pid munged)" munged && alive_as "$(recorded_pid slurmctld)" slurmctld \
        && alive_as "$(recorded_pid slurmd)" slurmd
}

node_state() { cluster_cmd sinfo -h -N -n localhost -o %T 2>/dev/null | head -n 1; }

wait_idle() {
    local timeout=${SLURM_LOCAL_START_TIMEOUT:-60} t0 state="" resumed=0
    t0=$(date +%s)
    while :; do
        kill -0 "$(recorded_pid slurmctld)" 2>/dev/null || fail_start "slurmctld exited during start"
        kill -0 "$(recorded_pid slurmd)" 2>/dev/null || fail_start "slurmd exited during start"
        state=$(node_state)
        case "$state" in
            idle|mixed|allocated) return 0 ;;
            drained|draining|down|down\*|drained\*)
                # e.g. state recovered from an earlier run of this DIR
                if [ "$resumed" = 0 ] && cluster_cmd scontrol ping >/dev/null 2>&1; then
                    log "node is $state ($(cluster_cmd sinfo -h -R -o %E 2>/dev/null)); resuming it"
                    cluster_cmd scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        [ $(( $(date +%s) - t0 )) -lt "$timeout" ] || fail_start "node not idle after ${timeout}s (state '${state:-none}')"
        sleep 0.5
    done
}

do_start() {
    local t0 name
    t0=$(date +%s)
    if [ -f "$PIDS" ]; then
        if running_all && cluster_cmd scontrol ping >/dev/null 2>&1; then
            log "already running (DIR=$DIR)"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        log "stale $PIDS: stopping what is left of the previous start"
        for name in slurmd slurmctld munged; do kill_pid "$(recorded_pid "$name")" "$name"; done
        rm -f "$PIDS"
    fi
    [ "$(id -u)" = 0 ] || unavailable "the local cluster runs slurmd/slurmctld as root (SlurmUser=root); run as root"
    ensure_installed
    mkdir -p "$DIR/state" "$DIR/spool/slurmd.localhost" "$DIR/run" "$DIR/log"
    [ ${#MUNGE_SOCKET} -lt 100 ] || die "path too long for a unix socket: $MUNGE_SOCKET (use a shorter DIR)"
    write_conf
    export SLURM_CONF=$CONF
    : > "$PIDS"
    start_munged
    start_daemon slurmctld -D -i -f "$CONF"
    # slurmctld must be answering before slurmd registers
    for _ in $(seq 1 200); do
        cluster_cmd scontrol ping 2>/dev/null | grep -q 'is UP' && break
        kill -0 "$(recorded_pid slurmctld)" 2>/dev/null || fail_start "slurmctld exited during start"
        sleep 0.1
    done
    start_daemon slurmd -D -N localhost -f "$CONF"
    wait_idle
    check_recorded munged "$DIR/run/munged.pid"
    check_recorded slurmctld "$DIR/run/slurmctld.pid"
    check_recorded slurmd "$DIR/run/slurmd.pid"
    log "cluster up in $(( $(date +%s) - t0 ))s: $(tr '\n' ' ' < "$PIDS")(pids in $PIDS)"
    echo "export SLURM_CONF=$CONF"
}

# job processes of this cluster that outlived their job: with proctrack/linuxproc a process
# whose parent exits (e.g. "cmd &" in a batch script that then exits) escapes slurm's kill.
# Recognised by SLURM_JOB_ID plus SLURM_CONF=DIR/slurm.conf in their environment.
our_job_procs() {
    local d pid self_tree
    self_tree=" $$ $(ps -o ppid= -p $$ | tr -d ' ') "
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        case "$self_tree" in *" $pid "*) continue ;; esac
        grep -qzxF "SLURM_CONF=$CONF" "$d/environ" 2>/dev/null \
            && grep -qz '^SLURM_JOB_ID=' "$d/environ" 2>/dev/null && echo "$pid"
    done
    return 0
}

kill_stray_stepds() {
    local pid kids
    for pid in $(our_stepds); do
        kids=$(descendants "$pid" | tr '\n' ' ')
        log "killing leftover slurmstepd pid $pid and its job processes: ${kids:-none}"
        kill -STOP "$pid" 2>/dev/null || true
        # shellcheck disable=SC2086
        [ -z "${kids// /}" ] || kill -KILL $kids 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    done
    kids=$(our_job_procs | tr '\n' ' ')
    if [ -n "${kids// /}" ]; then
        log "killing leftover job processes of this cluster: $kids"
        # shellcheck disable=SC2086
        kill -KILL $kids 2>/dev/null || true
    fi
}

do_stop() {
    local pid name left entry
    if [ ! -f "$PIDS" ]; then
        log "not running (no $PIDS)"
        kill_stray_stepds
        return 0
    fi
    if alive_as "$(recorded_pid slurmctld)" slurmctld && cluster_cmd scontrol ping >/dev/null 2>&1; then
        left=$(cluster_cmd squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [ -n "${left// /}" ]; then
            log "cancelling jobs: $left"
            # shellcheck disable=SC2086
            cluster_cmd scancel $left 2>/dev/null || true
            for _ in $(seq 1 60); do
                [ -z "$(cluster_cmd squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    # SIGTERM to all three at once (each takes ~2 s to wind down), SIGKILL after 15 s
    local -a live=()
    for name in slurmd slurmctld munged; do
        pid=$(recorded_pid "$name")
        [ -n "$pid" ] || continue
        if alive_as "$pid" "$name"; then
            kill -TERM "$pid" 2>/dev/null || true
            live+=("$name:$pid")
        else
            log "$name (pid $pid) was not running"
        fi
    done
    for _ in $(seq 1 150); do
        local -a still=()
        for entry in ${live[@]+"${live[@]}"}; do
            if alive_as "${entry#*:}" "${entry%%:*}"; then still+=("$entry"); else log "stopped ${entry%%:*} (pid ${entry#*:})"; fi
        done
        live=(${still[@]+"${still[@]}"})
        [ ${#live[@]} -eq 0 ] && break
        sleep 0.1
    done
    for entry in ${live[@]+"${live[@]}"}; do
        log "${entry%%:*} (pid ${entry#*:}) ignored SIGTERM for 15 s: SIGKILL"
        kill -KILL "${entry#*:}" 2>/dev/null || true
    done
    kill_stray_stepds
    mv -f "$PIDS" "$PIDS.stopped"
    return 0
}

do_status() {
    local name pid rc=0
    if [ ! -f "$PIDS" ]; then echo "not running (no $PIDS)"; return 1; fi
    for name in munged slurmctld slurmd; do
        pid=$(recorded_pid "$name")
        if alive_as "$pid" "$name"; then echo "$name pid $pid running"; else echo "$name pid ${pid:-?} NOT running"; rc=1; fi
    done
    echo "SLURM_CONF=$CONF"
    cluster_cmd sinfo || rc=1
    cluster_cmd squeue || rc=1
    return $rc
}

case "$CMD" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage ;;
esac
