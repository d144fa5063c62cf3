#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (root, no cgroups, no accounting database), for
# the `slurm` tests: munge, slurmctld and slurmd from Debian's slurm-wlm. Idempotent.
#   bash scripts/slurm/start_single_node.sh        # installs the packages if missing, then starts
# sacct needs an accounting database, which this set-up has not: the `sacct` shim beside this
# script answers submitit's status queries from slurmctld's own job records (scontrol), so a job
# that dies without writing its result is seen as dead instead of waited on for ever.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
fi

host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
state=/var/spool/slurm-flare
mkdir -p /etc/slurm "$state/ctld" "$state/d" /run/munge /var/log/slurm /etc/munge /var/lib/munge /var/log/munge

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=flare
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=86400
# A cancelled job gets SIGKILL 2 s after SIGTERM (default 30 s), so a test that cancels a job
# does not depend on how fast this machine finishes it.
KillWait=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

if ! pgrep -x munged >/dev/null; then
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
fi
if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure  # running already: read the configuration written above
else
  /usr/sbin/slurmctld
fi
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd

for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "single-node SLURM up on $host ($cpus CPUs); sacct shim: $here/bin"
    exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
exit 1
