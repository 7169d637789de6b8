#!/usr/bin/env bash
# Start the three-node test cluster on this one machine, for the multi-node tests
# (tests/e2e_multinode.rs). Run as root; idempotent (a running cluster is left as it is); stop it
# with ci/stop-cluster.sh.
#
# Each node nI (I = 1..NODES) is a "anchor" process (`sleep infinity`) holding its own network,
# UTS, IPC and mount namespaces: hostname nI, its own /tmp and /dev/shm (tmpfs), its own sysfs,
# and one address, 10.77.0.1I/24 on eth0, a veth whose peer sits on the bridge cmpbr0
# (10.77.0.1 in the root namespace). No default route in the nodes, no forwarding: nothing leaves
# the bridge. Every node runs a real `slurmd -N nI` (port 6828) against this cluster's own
# slurmctld (10.77.0.1, port 6827) and the machine's munged, and a real sshd bound to its address
# that lets the test user in with a key (for mpiexec.hydra's ssh launcher). The test user's home is
# the one folder every node sees (a shared home); /var/tmp and /run are shared too, /tmp is not.
#
#   SLURM_CONF=/run/cmpirun-test-cluster/slurm.conf   the cluster's clients (salloc, srun, sbatch)
#   HYDRA_LAUNCHER_EXEC=/run/cmpirun-test-cluster/bin/ssh  ssh with the cluster's keys, for hydra
#   nsenter -t $(cat /run/cmpirun-test-cluster/n1.anchor) -n -u -i -m   enter node n1
#
# The node names are not in /etc/hosts (nothing of the machine is changed): Slurm knows the nodes'
# addresses (NodeAddr), ssh its HostName lines; the front end's host name resolves to loopback on
# the nodes, as Debian's "127.0.1.1 hostname" line makes it. The one-node cluster of
# ci/start-slurm.sh (127.0.0.1, ports 6817/6818) is not touched; both can run at once.
# SlurmdTimeout is 20 s, so that a lost node is declared down quickly (the node-loss test).
set -euo pipefail

C=${CLUSTER_DIR:-/run/cmpirun-test-cluster}
NODES=${NODES:-3}
NET=10.77.0
BR=cmpbr0
TEST_USER=${TEST_USER:-tuser}
say() { echo "start-cluster: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root"
for b in munged slurmctld slurmd sinfo srun ip nsenter unshare /usr/sbin/sshd ssh-keygen; do
    command -v "$b" >/dev/null || die "$b not found: run ci/install-packages.sh"
done
id "$TEST_USER" >/dev/null 2>&1 || die "no user $TEST_USER: run ci/setup-test-user.sh"

export SLURM_CONF=$C/slurm.conf
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() {
    alive "$C/slurmctld.pid" || return 1
    for i in $(seq 1 "$NODES"); do
        alive "$C/n$i.anchor" && alive "$C/slurmd-n$i.pid" && alive "$C/sshd-n$i.pid" || return 1
    done
    [ "$(sinfo -h -t idle,mix,alloc -o %D 2>/dev/null)" = "$NODES" ]
}
if running; then
    say "already running ($SLURM_CONF)"
    exit 0
fi
# A half-started cluster: start over.
"$(dirname "$0")/stop-cluster.sh" >/dev/null 2>&1 || true
trap 'say "failed; stopping what was started"; "$(dirname "$0")/stop-cluster.sh" >/dev/null 2>&1 || true' ERR

mkdir -p "$C/state" "$C/log" "$C/ssh" "$C/bin"
chmod 0755 "$C" "$C/ssh" "$C/bin"

# munge: the machine's munged (shared with the one-node cluster); started only if none answers.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || die "no /etc/munge/munge.key: run ci/start-slurm.sh once"
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    touch "$C/munged.ours"
    say "munged started"
fi

# The network: a bridge with the front end's address, one veth per node; IPv6 off everywhere.
ip link add $BR type bridge
sysctl -qw net.ipv6.conf.$BR.disable_ipv6=1
ip addr add $NET.1/24 dev $BR
ip link set $BR up
for i in $(seq 1 "$NODES"); do
    ip netns add cmpn$i
    ip netns exec cmpn$i sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip link add cmpv$i type veth peer name eth0 netns cmpn$i
    sysctl -qw net.ipv6.conf.cmpv$i.disable_ipv6=1
    ip link set cmpv$i master $BR up
    ip -n cmpn$i addr add $NET.1$i/24 dev eth0
    ip -n cmpn$i link set eth0 up
    ip -n cmpn$i link set lo up
done

# The nodes. `unshare --mount` makes every mount private to the node. A fresh sysfs (UCX lists
# the node's network devices from /sys/class/net) with the cgroup tree moved over it (slurmd
# needs /sys/fs/cgroup); tmpfs /dev/shm and /tmp (built on /mnt, then moved over /tmp).
for i in $(seq 1 "$NODES"); do
    mkdir -p "$C/cg-n$i"
    inner="mount --rbind /sys/fs/cgroup $C/cg-n$i && mount -t sysfs cmpn$i /sys &&
        mount --move $C/cg-n$i /sys/fs/cgroup &&
        mount -t tmpfs -o mode=1777,size=512m cmpn$i-shm /dev/shm &&
        mount -t tmpfs -o mode=1777,size=512m cmpn$i-tmp /mnt && mount --move /mnt /tmp &&
        hostname n$i && exec sleep infinity"
    setsid nsenter --net=/run/netns/cmpn$i unshare --mount --uts --ipc sh -c "$inner" \
        </dev/null >"$C/log/n$i.anchor.log" 2>&1 &
    echo $! >"$C/n$i.anchor"
done
for i in $(seq 1 "$NODES"); do
    a=$(cat "$C/n$i.anchor")
    for _ in $(seq 100); do
        [ "$(nsenter -t "$a" -u hostname 2>/dev/null)" = "n$i" ] && break
        sleep 0.02
    done
    [ "$(nsenter -t "$a" -u hostname 2>/dev/null)" = "n$i" ] || die "node n$i did not come up: $(cat "$C/log/n$i.anchor.log")"
done

# Slurm: this cluster's own slurmctld, ports and state; each node has 2 CPUs (`-N3 -n6` puts 2 ranks on each).
host=$(hostname -s)
mem=$(awk '/^MemTotal:/{print int($2 / 1024 / 4)}' /proc/meminfo)
cat >"$SLURM_CONF" <<CONF
# Three-node test cluster for cmpirun (written by ci/start-cluster.sh).
ClusterName=cmpmulti
SlurmctldHost=$host($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=20
SlurmctldPidFile=$C/slurmctld.pid
SlurmctldLogFile=$C/log/slurmctld.log
StateSaveLocation=$C/state
SlurmdPidFile=$C/slurmd-%n.pid
SlurmdSpoolDir=$C/spool-%n
SlurmdLogFile=$C/log/slurmd-%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldPort=6827
SlurmdPort=6828
NodeName=n[1-$NODES] NodeAddr=$NET.1[1-$NODES] NodeHostname=n[1-$NODES] CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
chmod 0644 "$SLURM_CONF"
slurmctld -c -f "$SLURM_CONF"
for i in $(seq 1 "$NODES"); do
    mkdir -p "$C/spool-n$i" # slurmd does not create it
    nsenter -t "$(cat "$C/n$i.anchor")" -n -u -i -m slurmd -f "$SLURM_CONF" -N n$i
done

# sshd per node, bound to the node's address, with a key of the test user.
K=$C/ssh
ssh-keygen -q -t ed25519 -N '' -C cmpirun-test-cluster-host -f "$K/host_key"
ssh-keygen -q -t ed25519 -N '' -C cmpirun-test-cluster -f "$K/id"
cp "$K/id.pub" "$K/authorized_keys"
chmod 0644 "$K/authorized_keys"
chown "$TEST_USER:" "$K/id"
chmod 0600 "$K/id"
cat >"$K/sshd_config" <<CONF
HostKey $K/host_key
AuthorizedKeysFile $K/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
# The test user has no password (a locked account): only PAM lets sshd accept its key.
UsePAM yes
PermitRootLogin no
AllowUsers $TEST_USER
StrictModes no
PrintMotd no
CONF
{
    for i in $(seq 1 "$NODES"); do printf 'Host n%s\n    HostName %s\n' "$i" "$NET.1$i"; done
    cat <<CONF
Host *
    User $TEST_USER
    IdentityFile $K/id
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 5
CONF
} >"$K/ssh_config"
printf '#!/bin/sh\n# ssh with the test cluster'"'"'s key and node addresses (HYDRA_LAUNCHER_EXEC).\nexec ssh -F %s "$@"\n' "$K/ssh_config" >"$C/bin/ssh"
chmod 0755 "$C/bin/ssh"
[ -d /run/sshd ] || { mkdir -p /run/sshd && touch "$C/sshd-dir.ours"; }
for i in $(seq 1 "$NODES"); do
    nsenter -t "$(cat "$C/n$i.anchor")" -n -u -i -m /usr/sbin/sshd -f "$K/sshd_config" \
        -o ListenAddress=$NET.1$i -o PidFile="$C/sshd-n$i.pid" -E "$C/log/sshd-n$i.log"
done

for _ in $(seq 150); do
    [ "$(sinfo -h -t idle -o %D 2>/dev/null)" = "$NODES" ] && break
    sleep 0.1
done
[ "$(sinfo -h -t idle -o %D 2>/dev/null)" = "$NODES" ] ||
    die "the nodes did not come up: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' '); see $C/log/"
for i in $(seq 1 "$NODES"); do alive "$C/sshd-n$i.pid" || die "sshd of n$i did not start: $(cat "$C/log/sshd-n$i.log")"; done
trap - ERR
say "cluster up: nodes n[1-$NODES] at $NET.1[1-$NODES], SLURM_CONF=$SLURM_CONF, HYDRA_LAUNCHER_EXEC=$C/bin/ssh"
