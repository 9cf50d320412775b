#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine, for tests and demos (Debian/Ubuntu, as root).
#
#   .ci/slurm/up.sh [STATE_DIR]        # STATE_DIR, else $EWCSTAB_SLURM_DIR, else /tmp/ewcstab-slurm
#   .ci/slurm/down.sh [STATE_DIR]      # tears it down again (same STATE_DIR)
#
# Installs Debian's slurm-wlm, munge, slurmdbd and mariadb-server when they are missing, writes
# slurm.conf and slurmdbd.conf under STATE_DIR (state, spool, pid and log files too), links them
# from /etc/slurm (jobs and client commands find the config there; SLURM_CONF does not survive into
# job steps), starts munged (as user munge), a private MariaDB, slurmdbd, slurmctld and slurmd, and
# waits until `sinfo` shows the node idle. Idempotent: daemons already running for STATE_DIR are
# left alone. Every wait is bounded; on failure the relevant log tails are printed.
#
# Settings (environment):
#   EWCSTAB_SLURM_PARTITION   partition to create (default: main, the name profiles/slurm uses)
#   EWCSTAB_SLURM_ACCOUNTING  slurmdbd (default: real accounting, sacct works) or none (no database;
#                             use `slurm-status-command: squeue` then)
#   EWCSTAB_SLURM_DB_PORT     TCP port of the private MariaDB on 127.0.0.1 (default 13306)
#   EWCSTAB_SLURM_TIMEOUT     seconds allowed for each wait (default 60)
#   EWCSTAB_SLURM_APT_TIMEOUT seconds allowed for apt-get update + install (default 600)
set -euo pipefail

DIR="${1:-${EWCSTAB_SLURM_DIR:-/tmp/ewcstab-slurm}}"
PARTITION="${EWCSTAB_SLURM_PARTITION:-main}"
ACCOUNTING="${EWCSTAB_SLURM_ACCOUNTING:-slurmdbd}"
DB_PORT="${EWCSTAB_SLURM_DB_PORT:-13306}"
TIMEOUT="${EWCSTAB_SLURM_TIMEOUT:-60}"
APT_TIMEOUT="${EWCSTAB_SLURM_APT_TIMEOUT:-600}"
NODE="$(hostname -s)"
CLUSTER="ewcstab"
ETC_LINKS=(/etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf)

log() { printf '[slurm up %(%T)T] %s\n' -1 "$*" >&2; }
# Exit status: 0 up; 1 a failure while bringing it up; 3 the packages cannot be installed;
# 4 another SLURM (site config or daemons) is in the way. Tests skip on 3 and 4 outside CI.
die() { log "ERROR: $*"; exit 1; }
die_install() { log "ERROR: $*"; exit 3; }
die_foreign() { log "ERROR: $*"; exit 4; }

case "$ACCOUNTING" in
    slurmdbd | none) ;;
    *) die "EWCSTAB_SLURM_ACCOUNTING must be slurmdbd or none, not '$ACCOUNTING'" ;;
esac
[[ "$(id -u)" == 0 ]] || die_install "must run as root (starts system daemons, writes /etc/slurm)"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
ETC="$DIR/etc" RUN="$DIR/run" LOGS="$DIR/log"

# On failure, show what the daemons said.
dump_logs() {
    local f
    for f in "$LOGS"/*.log /var/log/munge/munged.log; do
        [[ -s "$f" ]] || continue
        echo "----- tail of $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}
on_exit() {
    local rc=$?
    if [[ $rc != 0 && $rc != 3 && $rc != 4 ]]; then
        log "failed (exit $rc); logs follow"
        dump_logs
    fi
}
trap on_exit EXIT

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds, or fail after SECONDS.
wait_for() {
    local secs="$1" what="$2" deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for: $what"
        sleep 0.5
    done
}

# alive PIDFILE NAME: the process in PIDFILE is running and is NAME (guards against reused pids).
alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc 0-9 <"$1" 2>/dev/null)" || return 1
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2"* ]]
}

# ---------------------------------------------------------------- packages
need=(slurmctld slurmd sinfo sbatch sacct munged munge unmunge)
pkgs=(slurm-wlm munge)
if [[ "$ACCOUNTING" == slurmdbd ]]; then
    need+=(slurmdbd mariadbd mariadb-install-db mariadb-admin mariadb)
    pkgs+=(slurmdbd mariadb-server mariadb-client)
fi
missing=()
for cmd in "${need[@]}"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die_install "missing ${missing[*]} and no apt-get to install ${pkgs[*]}"
    log "installing ${pkgs[*]} (missing: ${missing[*]})"
    # Keep the packages' own service scripts from starting system daemons during the install.
    made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_rc=0
    {
        timeout "$APT_TIMEOUT" apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT" apt-get install -y -q \
                --no-install-recommends -o DPkg::Lock::Timeout=120 "${pkgs[@]}"
    } >"$DIR/apt.log" 2>&1 || apt_rc=$?
    [[ -z "$made_policy" ]] || rm -f /usr/sbin/policy-rc.d
    if ((apt_rc)); then
        tail -n 30 "$DIR/apt.log" >&2
        die_install "apt-get failed (exit $apt_rc); full log: $DIR/apt.log"
    fi
    for cmd in "${need[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || die_install "$cmd still missing after installing ${pkgs[*]}"
    done
fi
log "$(slurmctld -V)"

# ---------------------------------------------------------------- files
mkdir -p "$ETC" "$RUN" "$LOGS" "$DIR/state" "$DIR/spool"
touch "$DIR/.ewcstab-slurm"
mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
real_mb=$((mem_mb * 9 / 10)) # below the machine's, or slurmd drains the node
cpus="$(nproc)"

if [[ "$ACCOUNTING" == slurmdbd ]]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat >"$ETC/slurm.conf.new" <<EOF
# One-node cluster written by .ci/slurm/up.sh (state dir $DIR).
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
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
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$acct
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
rm -f "$ETC/slurmdbd.conf" # written below only with accounting; never link a stale one

DB_PASS=""
if [[ "$ACCOUNTING" == slurmdbd ]]; then
    [[ -s "$ETC/db.pass" ]] || (umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/db.pass")
    DB_PASS="$(cat "$ETC/db.pass")"
    (
        umask 077
        cat >"$ETC/slurmdbd.conf.new" <<EOF
# slurmdbd for the one-node cluster of .ci/slurm/up.sh (state dir $DIR).
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf" # slurmdbd insists on mode 600, owner SlurmUser
fi

# ---------------------------------------------------------------- /etc/slurm links
# A slurmctld or slurmd of someone else would hold the ports.
for d in slurmctld slurmd slurmdbd; do
    alive "$RUN/$d.pid" "$d" && continue
    for pid in $(pgrep -x "$d" || true); do
        die_foreign "a $d (pid $pid) not started from $DIR is running; stop it first"
    done
done

# Refuse to touch a real site config; take over a link left behind by a dead cluster of ours.
mkdir -p /etc/slurm
for link in "${ETC_LINKS[@]}"; do
    target="$ETC/$(basename "$link")"
    [[ -e "$target" ]] || continue
    if [[ -L "$link" ]]; then
        current="$(readlink "$link")"
        [[ "$current" == "$target" ]] && continue
        other="$(dirname "$(dirname "$current")")"
        [[ -e "$other/.ewcstab-slurm" || ! -e "$current" ]] ||
            die_foreign "$link links to $current, not a cluster of this script: refusing to replace it"
        if [[ -e "$other/.ewcstab-slurm" ]]; then
            for d in slurmd slurmctld slurmdbd; do
                ! alive "$other/run/$d.pid" "$d" ||
                    die_foreign "another cluster of this script runs from $other: .ci/slurm/down.sh $other first"
            done
        fi
        log "replacing stale link $link -> $current"
        rm -f "$link"
    elif [[ -e "$link" ]]; then
        die_foreign "$link exists and is not a link made by this script: refusing to overwrite a site config"
    fi
    ln -s "$target" "$link"
    grep -qxF "$link" "$DIR/links" 2>/dev/null || echo "$link" >>"$DIR/links"
done

# ---------------------------------------------------------------- munged
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
if munge_ok 2>/dev/null; then
    log "munged already answers; using it"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    rm -f /run/munge/munge.socket.2.lock # left by a munged killed with -9
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for "$TIMEOUT" "munged to answer" munge_ok
    cp /run/munge/munged.pid "$RUN/munged.pid" # down.sh stops only the munged started here
fi

# ---------------------------------------------------------------- MariaDB + slurmdbd
if [[ "$ACCOUNTING" == slurmdbd ]]; then
    DB_SOCK="$RUN/mariadbd.sock"
    db() { mariadb --no-defaults -S "$DB_SOCK" -u root "$@"; }
    db_opts=(--no-defaults --datadir="$DIR/mysql" --user=root --innodb-buffer-pool-size=64M
        --innodb-log-file-size=16M)
    if ! alive "$RUN/mariadbd.pid" mariadbd; then
        if [[ ! -d "$DIR/mysql/mysql" ]]; then
            log "initialising MariaDB in $DIR/mysql"
            rm -rf "$DIR/mysql"
            timeout "$((TIMEOUT * 2))" mariadb-install-db "${db_opts[@]}" --auth-root-authentication-method=socket \
                --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 ||
                die "mariadb-install-db failed; see $LOGS/mariadb-install.log"
        fi
        log "starting mariadbd on 127.0.0.1:$DB_PORT"
        setsid mariadbd "${db_opts[@]}" --socket="$DB_SOCK" --pid-file="$RUN/mariadbd.pid" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --log-error="$LOGS/mariadbd.log" </dev/null >/dev/null 2>&1 &
        wait_for "$TIMEOUT" "mariadbd to accept connections" mariadb-admin --no-defaults -S "$DB_SOCK" -u root ping
    fi
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
        log "starting slurmdbd"
        slurmdbd
    fi
    # slurmdbd answers once it has created its tables (sacctmgr reads slurm.conf for the host).
    wait_for "$TIMEOUT" "slurmdbd to answer sacctmgr" timeout 10 sacctmgr -n -i list cluster
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if ! alive "$RUN/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    slurmctld
fi
wait_for "$TIMEOUT" "slurmctld to answer" timeout 10 scontrol ping
if ! alive "$RUN/slurmd.pid" slurmd; then
    log "starting slurmd"
    slurmd
fi
node_idle() { [[ "$(timeout 10 sinfo -h -n "$NODE" -p "$PARTITION" -o %t)" == idle ]]; }
wait_for "$TIMEOUT" "node $NODE idle in partition $PARTITION" node_idle
if [[ "$ACCOUNTING" == slurmdbd ]]; then
    # slurmctld registers the cluster with slurmdbd; jobs get accounted from then on.
    wait_for "$TIMEOUT" "cluster $CLUSTER registered in slurmdbd" \
        bash -c "timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
fi
log "up: $(sinfo -h -o '%P %D %t %c CPUs %m MB' | tr -s ' '), accounting=$ACCOUNTING, state in $DIR"
