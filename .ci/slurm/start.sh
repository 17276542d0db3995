#!/usr/bin/env bash
# start-local-slurm.sh - bring up a REAL Slurm cluster on this one machine,
# for integration tests (e.g. submitit chained / requeued jobs).
#
# Tested on Debian 12 (bookworm), as root, no systemd (plain background
# daemons), Debian's slurm-wlm 22.05.8, munge 0.5.15, MariaDB 10.11.
#
# Idempotent: installs missing packages, (re)writes the config, starts only
# the daemons that are not already running, records the PIDs of the daemons
# IT started in $STATE/started.pids, and waits until the node(s) are idle.
# Re-running with the same settings is a no-op; with different settings
# it restarts the Slurm daemons it started.
#
# Knobs (environment variables):
#   SLURM_LOCAL_DIR=/tmp/kit-slurm  runtime state: spool, logs, pids
#   SLURM_LOCAL_ACCOUNTING=slurmdbd  slurmdbd: MariaDB + slurmdbd, so plain
#                                   `sacct` works (submitit needs sacct for
#                                   job states). none: no DB; plain sacct fails
#                                   ("accounting storage is disabled"), only
#                                   `sacct -c` (jobcomp/filetxt, finished jobs)
#   SLURM_LOCAL_NODES=1             >1: N slurmd daemons (node1..nodeN) on
#                                   this host, ports 17001.., via slurmd -N
#   SLURM_LOCAL_CPUS=<nproc>        CPUs advertised per node (may exceed real
#                                   cores: SlurmdParameters=config_overrides)
#   SLURM_LOCAL_FAST=1              1: CI timings - a requeued job restarts after
#                                   ~cred_expire+1..3 s instead of ~2.5-3 min
#                                   (AuthInfo=cred_expire, sched_interval=2,
#                                   bf_interval=2). 0: Slurm defaults (as on a
#                                   real cluster).
#   SLURM_LOCAL_CRED_EXPIRE=10      cred_expire (s) used when FAST=1 (5 works
#                                   too; very low values risk "credential
#                                   expired" step launches on a loaded host)
#   SLURM_LOCAL_ETC_HOSTS=0         1: with NODES>1, add "127.0.0.1 node1 ..."
#                                   to /etc/hosts (tagged; removed by stop) so
#                                   node names resolve, e.g. for the
#                                   MASTER_ADDR=node1 that submitit's
#                                   TorchDistributedEnvironment derives
#   SLURM_LOCAL_CLEAN=0             1: wipe slurmctld state + accounting DB
#                                   first (job ids restart at 1)
#
# Stop with:  .ci/slurm/stop.sh
set -euo pipefail
# Daemons outlive whoever starts them (a test may restart Slurm with two nodes): they must not carry the
# test session's mark, or the suite's leftover check (tests/conftest.py) would take them for a leak.
unset KIT_TEST_SESSION

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${SLURM_LOCAL_DIR:-/tmp/kit-slurm}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-slurmdbd}
NODES=${SLURM_LOCAL_NODES:-1}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
FAST=${SLURM_LOCAL_FAST:-1}
CLEAN=${SLURM_LOCAL_CLEAN:-0}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
ETC_HOSTS=${SLURM_LOCAL_ETC_HOSTS:-0}
PIDS=$STATE/started.pids          # "name pid" lines: daemons started by us
CONF=/etc/slurm/slurm.conf        # default path: sbatch/sacct/submitit need no env
DBPASS=slurmdbpass                # local-only DB password (socket, no TCP)
T0=$(date +%s.%N)

log() { printf '[start-local-slurm %s] %s\n' "$(date +%T)" "$*"; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (daemons, /etc/slurm, apt)"

# pid_alive PID COMM: PID is running and its /proc/PID/comm equals COMM
# (guards against a stale pid file whose PID was reused by something else).
pid_alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm")" = "$2" ]; }
pid_from() { [ -r "$1" ] && tr -dc '0-9' < "$1" || true; }
record() { echo "$1 $2" >> "$PIDS"; log "started $1 (pid $2)"; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "timed out after ${t}s waiting for $what"
}

# ---------------------------------------------------------------- 1. packages
pkgs=(slurmctld slurmd slurm-client munge)
[ "$ACCOUNTING" = slurmdbd ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # In Docker-like images /usr/sbin/policy-rc.d (exit 101) stops postinst from
  # starting services; on a systemd VM postinst may start munge/mariadb itself
  # (we then reuse them below) - slurmd/slurmctld won't start (no slurm.conf).
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
T_INSTALLED=$(date +%s.%N)

mkdir -p "$STATE"/{log,spool,ctld} /etc/slurm
chown slurm:slurm "$STATE"/{log,ctld}   # SlurmUser=slurm writes logs + StateSaveLocation
touch "$PIDS"

# ------------------------------------------------------------------- 2. munge
# Debian's postinst normally creates /etc/munge/munge.key; make sure.
if [ ! -s /etc/munge/munge.key ]; then mungekey -c -f -k /etc/munge/munge.key; fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge   # /run is tmpfs-like: gone after reboot
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running - reusing it"
else
  # Run as the munge user (owns key, socket dir, log), like the systemd unit does.
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged bash -c 'munge -n | unmunge'
  record munged "$(pid_from /run/munge/munged.pid)"
fi

# ----------------------------------------------------- 3. MariaDB + slurmdbd
if [ "$ACCOUNTING" = slurmdbd ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then      # datadir not initialised by postinst
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  if mysqladmin ping >/dev/null 2>&1; then
    log "MariaDB already running - reusing it"
  else
    # Foreground server, detached: unix socket only (no TCP port 3306),
    # small buffer pool to keep RAM low.
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
    wait_for 60 MariaDB mysqladmin ping
    record mariadbd "$(pid_from /run/mysqld/mysqld.pid)"
  fi
  if [ "$CLEAN" = 1 ]; then
    if pid_alive "$(pid_from /run/slurmdbd.pid)" slurmdbd; then die "CLEAN=1 needs slurmdbd stopped first (run stop-local-slurm.sh)"; fi
    mysql -e "DROP DATABASE IF EXISTS slurm_acct_db;"
  fi
  # root@localhost uses unix_socket auth on Debian: no password needed here.
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf.new <<EOF
# generated by start-local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
  # slurmdbd refuses to start unless slurmdbd.conf is 0600 and owned by SlurmUser.
  chown slurm:slurm /etc/slurm/slurmdbd.conf.new; chmod 600 /etc/slurm/slurmdbd.conf.new
  dbd_pid=$(pid_from /run/slurmdbd.pid)
  if pid_alive "$dbd_pid" slurmdbd && cmp -s /etc/slurm/slurmdbd.conf.new /etc/slurm/slurmdbd.conf; then
    rm /etc/slurm/slurmdbd.conf.new; log "slurmdbd already running (pid $dbd_pid)"
  else
    if pid_alive "$dbd_pid" slurmdbd; then kill "$dbd_pid"; while pid_alive "$dbd_pid" slurmdbd; do sleep 0.2; done; fi
    mv /etc/slurm/slurmdbd.conf.new /etc/slurm/slurmdbd.conf
    /usr/sbin/slurmdbd            # daemonises; writes /run/slurmdbd.pid
    wait_for 30 "slurmdbd port 6819" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
    record slurmdbd "$(pid_from /run/slurmdbd.pid)"
  fi
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# -------------------------------------------------------------- 4. slurm.conf
HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
if [ "$NODES" -gt 1 ]; then
  # Several slurmd on one host: Debian builds Slurm with --enable-multiple-slurmd
  # (`scontrol show config` prints MULTIPLE_SLURMD = Yes). Each slurmd is
  # started with -N nodeK and listens on its own Port; %n in paths = node name.
  NODE_MEM=$(( (MEM_MB - 2048) / NODES ))
  NODE_LINES="NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=$NODE_MEM State=UNKNOWN"
  NODE_NAMES=$(seq -f 'node%g' 1 "$NODES" | tr '\n' ' ')
  if [ "$ETC_HOSTS" = 1 ]; then
    unresolved=$(for n in $NODE_NAMES; do getent hosts "$n" >/dev/null || printf '%s ' "$n"; done)
    if [ -n "$unresolved" ]; then
      echo "127.0.0.1 ${unresolved% } # added by start-local-slurm.sh" >> /etc/hosts
      echo "${unresolved% }" >> "$STATE/etc-hosts-added"
      log "added to /etc/hosts: 127.0.0.1 ${unresolved% }"
    fi
  fi
else
  NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$((MEM_MB - 1024)) State=UNKNOWN"
  NODE_NAMES=$HOST
  # Back to one node after a multi-node run (tests/test_chain_twonode.py): undo our /etc/hosts line.
  if [ -f "$STATE/etc-hosts-added" ]; then
    grep -v ' # added by start-local-slurm.sh$' /etc/hosts > "$STATE/hosts.tmp" &&
      cat "$STATE/hosts.tmp" > /etc/hosts && rm -f "$STATE/hosts.tmp" "$STATE/etc-hosts-added"
    log "removed start-local-slurm.sh lines from /etc/hosts"
  fi
fi
if [ "$FAST" = 1 ]; then
  # cred_expire: a requeued job (scontrol requeue, what submitit does on
  # timeout) gets BeginTime = requeue time + cred_expire + 1 (default 120 s);
  # sched_interval: main scheduler pass (default 60 s) that then starts it.
  TIMING_LINES="AuthInfo=cred_expire=$CRED_EXPIRE
SchedulerParameters=sched_interval=2,bf_interval=2"
else
  TIMING_LINES="# Slurm default timings (requeue restart delay ~120-180 s)"
fi
cat > "$CONF.new" <<EOF
# generated by start-local-slurm.sh  (Slurm 22.05, single machine)
ClusterName=localcluster
# Controller = this host; 127.0.0.1 so nothing depends on DNS/hostname resolution.
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
$TIMING_LINES
MailProg=/bin/true
MpiDefault=none
# No cgroup/systemd needed: linuxproc tracks job processes via /proc parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Trust node sizes in this file (lets CPUs exceed real cores, several slurmd share cores).
SlurmdParameters=config_overrides
ReturnToService=2
# (KillWait=30 s, OverTimeLimit=0, MinJobAge=300 s and JobRequeue=1 are the defaults.)
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool/slurmd-%n
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
$ACCT_LINES
# Completion log: also makes \`sacct -c\` work without slurmdbd (finished jobs only).
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
$NODE_LINES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

ctld_pid=$(pid_from /run/slurmctld.pid)
if pid_alive "$ctld_pid" slurmctld && cmp -s "$CONF.new" "$CONF"; then
  rm "$CONF.new"; CONF_CHANGED=0
else
  CONF_CHANGED=1
  if pid_alive "$ctld_pid" slurmctld || ls /run/slurmd-*.pid >/dev/null 2>&1; then
    log "config changed: restarting Slurm daemons"
    "$HERE/stop.sh" --slurm-only
  fi
  mv "$CONF.new" "$CONF"
fi

# ------------------------------------------------------ 5. slurmctld + slurmd
if [ "$CLEAN" = 1 ] && ! pid_alive "$(pid_from /run/slurmctld.pid)" slurmctld; then
  rm -rf "${STATE:?}/ctld/"* "${STATE:?}/spool/"*
fi
if pid_alive "$(pid_from /run/slurmctld.pid)" slurmctld; then
  log "slurmctld already running"
else
  /usr/sbin/slurmctld            # daemonises as SlurmUser=slurm
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
  record slurmctld "$(pid_from /run/slurmctld.pid)"
fi
for n in $NODE_NAMES; do
  if pid_alive "$(pid_from "/run/slurmd-$n.pid")" slurmd; then
    log "slurmd $n already running"
  else
    mkdir -p "$STATE/spool/slurmd-$n"
    # slurmd runs as root (it must, to launch jobs as the submitting user).
    /usr/sbin/slurmd -N "$n"
    wait_for 15 "slurmd $n" test -s "/run/slurmd-$n.pid"
    record "slurmd-$n" "$(pid_from "/run/slurmd-$n.pid")"
  fi
done

# Nodes come up as idle after registering; resume any left DOWN/DRAIN from a previous run.
for _ in $(seq 1 60); do
  if ! sinfo -h -N -o '%t' | grep -qvE '^(idle|mix|alloc|comp)$'; then break; fi
  scontrol update NodeName="$(echo $NODE_NAMES | tr ' ' ',')" State=RESUME >/dev/null 2>&1 || true
  sleep 0.5
done
sinfo -h -N -o '%t' | grep -qvE '^(idle|mix|alloc|comp)$' && { sinfo -N -l; die "node(s) not idle"; }
if [ "$ACCOUNTING" = slurmdbd ]; then
  # slurmctld registers the cluster in slurmdbd by itself; wait until sacct answers.
  wait_for 30 "sacct" sacct -n -X -S now
fi

T1=$(date +%s.%N)
sinfo
log "up: $(awk -v a="$T0" -v b="$T_INSTALLED" -v c="$T1" 'BEGIN{printf "install %.1fs, configure+start %.1fs, total %.1fs", b-a, c-b, c-a}')"
log "config: $CONF   logs: $STATE/log   pids started by this script: $PIDS"
log "stop with: $HERE/stop.sh"
