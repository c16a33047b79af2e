#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for CI and for tests marked `slurm`.
#
# Debian's slurm-wlm (22.05) + munge, run as root without systemd. Idempotent: when the
# daemons already run with the same configuration it only checks that the node is up.
# The node has this machine's real CPUs and memory and one fake GPU (a gres declared on a
# tty device) so that jobs asking for `--gpus=1` can be scheduled.
#
# Environment (all optional):
#   SLURM_CI_PARTITION  partition name (default: main, as in profiles/slurm/config.yaml)
#   SLURM_CI_TIMEOUT    seconds to wait for the node to become idle (default: 60)
#   SLURM_CI_GPU_TYPE   give the fake GPU a type (e.g. a100) so that jobs asking for
#                       `--gpus=<type>:1` (rules with a gpu_model) run too (default: none)
#   SLURM_CI_NO_INSTALL set to 1 to fail instead of installing missing packages
#
# Exit status: 0 when `sinfo` shows the node idle (or busy with jobs), non-zero with a
# message saying what failed otherwise. Stop with .ci/slurm/stop.sh.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

PARTITION="${SLURM_CI_PARTITION:-main}"
TIMEOUT="${SLURM_CI_TIMEOUT:-60}"
GPU_TYPE="${SLURM_CI_GPU_TYPE:-}"
CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
MUNGE_RUN=/run/munge
MUNGE_KEY=/etc/munge/munge.key

log() { echo "slurm/start.sh: $*" >&2; }
die() {
    echo "slurm/start.sh: ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -s "$f" ]; then
            echo "--- last lines of $f" >&2
            tail -n 15 "$f" >&2
        fi
    done
    exit 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

# --- 1. packages -------------------------------------------------------------------------
missing=()
for bin in slurmctld slurmd sinfo sbatch srun squeue; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
command -v munged >/dev/null 2>&1 || missing+=(munged)
if [ ${#missing[@]} -gt 0 ]; then
    [ "${SLURM_CI_NO_INSTALL:-0}" = 1 ] && die "missing ${missing[*]} and SLURM_CI_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install slurm-wlm/munge"
    log "installing slurm-wlm and munge (missing: ${missing[*]})"
    # Keep maintainer scripts from starting the services (no systemd here).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        slurm-wlm munge >/dev/null; } || rc=$?
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || die "apt-get could not install slurm-wlm munge (exit $rc)"
fi

# --- 2. configuration ---------------------------------------------------------------------
NODE="$(hostname -s)"
# Real hardware as slurmd sees it, e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1
# CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105".
hw="$(slurmd -C 2>/dev/null | head -n 1 || true)"
if [[ "$hw" == NodeName=* ]]; then
    hw="${hw#NodeName=* }"
else
    hw="CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/ {print $2}')"
fi
# A fake GPU: any existing character device will do with TaskPlugin=task/none.
GPU_DEV=""
for d in /dev/tty0 /dev/tty1 /dev/tty /dev/null; do
    if [ -c "$d" ]; then GPU_DEV="$d"; break; fi
done
[ -n "$GPU_DEV" ] || die "no character device to declare the fake GPU on"
if [ -n "$GPU_TYPE" ]; then
    [[ "$GPU_TYPE" =~ ^[A-Za-z0-9_.]+$ ]] || die "SLURM_CI_GPU_TYPE '$GPU_TYPE' is not a plain name"
    NODE_GRES="gpu:${GPU_TYPE}:1"
    GRES_TYPE=" Type=${GPU_TYPE}"
else
    NODE_GRES="gpu:1"
    GRES_TYPE=""
fi

mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
tmp_conf="$(mktemp)"
tmp_gres="$(mktemp)"
trap 'rm -f "$tmp_conf" "$tmp_gres"' EXIT
cat >"$tmp_conf" <<EOF
# Written by .ci/slurm/start.sh: one-node test cluster (root, no systemd, no accounting).
ClusterName=vlmlayers-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Keep finished jobs visible to squeue for 10 min: the executor plugin polls with squeue.
MinJobAge=600
ReturnToService=2
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPort=6817
SlurmdPort=6818
InactiveLimit=0
KillWait=30
Waittime=0
GresTypes=gpu
NodeName=${NODE} NodeAddr=127.0.0.1 ${hw} Gres=${NODE_GRES} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
cat >"$tmp_gres" <<EOF
# Written by .ci/slurm/start.sh: a fake GPU so that --gpus=1 jobs can be scheduled.
AutoDetect=off
NodeName=${NODE} Name=gpu${GRES_TYPE} File=${GPU_DEV}
EOF

changed=0
if ! cmp -s "$tmp_conf" "$CONF_DIR/slurm.conf" || ! cmp -s "$tmp_gres" "$CONF_DIR/gres.conf"; then
    changed=1
    install -m 644 "$tmp_conf" "$CONF_DIR/slurm.conf"
    install -m 644 "$tmp_gres" "$CONF_DIR/gres.conf"
    log "wrote $CONF_DIR/slurm.conf (node $NODE: $hw, gres gpu on $GPU_DEV)"
fi
# Job steps do not inherit SLURM_CONF, so the config must be at the default path anyway.
export SLURM_CONF="$CONF_DIR/slurm.conf"

# --- 3. munge -----------------------------------------------------------------------------
if [ ! -s "$MUNGE_KEY" ]; then
    mkdir -p "$(dirname "$MUNGE_KEY")"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" --force
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    log "created $MUNGE_KEY"
fi
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
chown "$MUNGE_USER:" "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
chmod 700 "$(dirname "$MUNGE_KEY")"
chmod 400 "$MUNGE_KEY"
mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
chown "$MUNGE_USER:" "$MUNGE_RUN" /var/lib/munge /var/log/munge
chmod 755 "$MUNGE_RUN" # clients (slurm commands in jobs) must reach the socket
if ! alive "$MUNGE_RUN/munged.pid"; then
    rm -f "$MUNGE_RUN/munged.pid"
    log "starting munged"
    if [ "$MUNGE_USER" = root ]; then
        munged --force || die "munged did not start"
    else
        runuser -u munge -- munged || die "munged did not start"
    fi
fi
for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.25
done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge round trip (munge -n | unmunge) fails"

# --- 4. slurmctld + slurmd ----------------------------------------------------------------
if [ "$changed" = 1 ]; then
    # New configuration: restart whatever runs with the old one.
    for pidf in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"; do
        if alive "$pidf"; then
            log "configuration changed: stopping $(basename "$pidf" .pid)"
            pid="$(cat "$pidf")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && die "$(basename "$pidf" .pid) (pid $pid) does not stop"
        fi
    done
fi
if ! alive "$RUN_DIR/slurmctld.pid"; then
    rm -f "$RUN_DIR/slurmctld.pid"
    log "starting slurmctld"
    slurmctld -i || die "slurmctld did not start"
fi
for _ in $(seq 1 40); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.25
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer (scontrol ping)"
if ! alive "$RUN_DIR/slurmd.pid"; then
    rm -f "$RUN_DIR/slurmd.pid"
    log "starting slurmd"
    slurmd || die "slurmd did not start"
fi

# --- 5. wait for the node ------------------------------------------------------------------
state=""
deadline=$((SECONDS + TIMEOUT))
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
    idle | mixed | allocated | completing)
        log "cluster up: node $NODE is $state (partition $PARTITION)"
        sinfo -N -o '%N %P %T %c %m %G'
        exit 0
        ;;
    down* | drain* | drained* | fail*)
        # e.g. left down by an earlier run: let it serve again.
        scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        ;;
    esac
    sleep 0.5
done
reason="$(sinfo -h -n "$NODE" -o '%E' 2>/dev/null || true)"
die "node $NODE not idle after ${TIMEOUT}s (state: '${state:-none}', reason: '${reason:-none}')"
