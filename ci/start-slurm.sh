#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for the launch tests: munged, slurmctld and slurmd
# on 127.0.0.1, configured in $SLURM_DIR (default /run/cmpirun-test-slurm). Idempotent: a running
# cluster is left as it is. Run as root. Clients find it with
#
#   export SLURM_CONF=/run/cmpirun-test-slurm/slurm.conf
#
# The node offers CPUS (default 16) CPUs whatever the machine has (SlurmdParameters=config_overrides)
# so jobs of several ranks fit on a small machine; nothing is bound to cores (TaskPlugin=task/none).
# Stop it with ci/stop-slurm.sh.
set -euo pipefail

S=${SLURM_DIR:-/run/cmpirun-test-slurm}
CPUS=${CPUS:-16}
say() { echo "start-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
for b in munged slurmctld slurmd sinfo srun; do
    command -v "$b" >/dev/null || die "$b not found: run ci/install-packages.sh"
done

host=$(hostname)
# Slurm resolves its own node name; a fresh VM may not know it.
if ! getent hosts "$host" >/dev/null; then
    echo "127.0.0.1 $host" >>/etc/hosts
    say "added $host to /etc/hosts"
fi

# munge: the key comes with the package; make one if the package did not.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged does not answer"
    say "munged started"
fi

mkdir -p "$S/state" "$S/spool"
chmod 0755 "$S"
mem=$(awk '/^MemTotal:/{print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf="$S/slurm.conf"
new_conf=$(cat <<CONF
# One-node test cluster for cmpirun (written by ci/start-slurm.sh).
ClusterName=cmptest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmdSpoolDir=$S/spool
StateSaveLocation=$S/state
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$S/slurmctld.pid" && alive "$S/slurmd.pid" && [ "$(cat "$conf" 2>/dev/null)" = "$new_conf" ]; then
    say "already running ($conf)"
else
    # A changed configuration or a half-started cluster: start over.
    "$(dirname "$0")/stop-slurm.sh" --keep-munge >/dev/null 2>&1 || true
    printf '%s\n' "$new_conf" >"$conf"
    chmod 0644 "$conf"
    export SLURM_CONF=$conf
    # -c: forget the jobs of a previous cluster (a machine restarted or killed mid-test keeps
    # them in the state folder, and they would hold the node's CPUs until they time out).
    slurmctld -c -f "$conf"
    slurmd -f "$conf"
fi

export SLURM_CONF=$conf
for _ in $(seq 150); do
    state=$(sinfo -h -o %t 2>/dev/null || true)
    case "$state" in
        idle* | mix* | alloc*) break ;;
        drain* | down*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle* | mix* | alloc*) ;;
    *) die "the node did not come up (state '$state'); see $S/slurmctld.log and $S/slurmd.log" ;;
esac
say "cluster up: node $host ($state), SLURM_CONF=$conf"
