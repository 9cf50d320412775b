#!/usr/bin/env bash
# Tear down the one-node SLURM cluster that .ci/slurm/up.sh started from STATE_DIR.
#
#   .ci/slurm/down.sh [STATE_DIR]      # STATE_DIR, else $EWCSTAB_SLURM_DIR, else /tmp/ewcstab-slurm
#
# Cancels the cluster's jobs, stops slurmd, slurmctld, slurmdbd, mariadbd and munged (the last only
# if up.sh started it) in that order, by the pids recorded under STATE_DIR/run: SIGTERM, a bounded
# wait, then SIGKILL for stragglers. Removes the /etc/slurm links up.sh created. Idempotent; the
# state directory itself (configs, logs, database) is kept for inspection.
#
#   EWCSTAB_SLURM_TIMEOUT   seconds allowed for each daemon to exit after SIGTERM (default 20)
set -euo pipefail

DIR="${1:-${EWCSTAB_SLURM_DIR:-/tmp/ewcstab-slurm}}"
TIMEOUT="${EWCSTAB_SLURM_TIMEOUT:-20}"

log() { printf '[slurm down %(%T)T] %s\n' -1 "$*" >&2; }

if [[ ! -e "$DIR/.ewcstab-slurm" ]]; then
    log "no cluster of up.sh in $DIR: nothing to do"
    exit 0
fi
DIR="$(cd "$DIR" && pwd -P)"
RUN="$DIR/run"

# pid_of PIDFILE NAME: the pid in PIDFILE if that process is running and is NAME, else nothing.
pid_of() {
    local pid
    [[ -s "$1" ]] || return 0
    pid="$(tr -dc 0-9 <"$1" 2>/dev/null)" || return 0
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 0
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2"* ]] && echo "$pid"
    return 0
}

# stop NAME: SIGTERM the daemon recorded in RUN/NAME.pid, wait, SIGKILL if it is still there.
stop() {
    local name="$1" pid deadline
    pid="$(pid_of "$RUN/$name.pid" "$name")"
    if [[ -z "$pid" ]]; then
        rm -f "$RUN/$name.pid"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while [[ -n "$(pid_of "$RUN/$name.pid" "$name")" ]] && ((SECONDS < deadline)); do sleep 0.2; done
    if [[ -n "$(pid_of "$RUN/$name.pid" "$name")" ]]; then
        log "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while [[ -n "$(pid_of "$RUN/$name.pid" "$name")" ]] && ((SECONDS < deadline)); do sleep 0.2; done
        [[ -z "$(pid_of "$RUN/$name.pid" "$name")" ]] || log "WARNING: $name (pid $pid) survived SIGKILL"
    fi
    rm -f "$RUN/$name.pid"
}

# Jobs first, while slurmctld can still cancel them (their slurmstepd processes end with them).
if [[ -n "$(pid_of "$RUN/slurmctld.pid" slurmctld)" && -L /etc/slurm/slurm.conf ]]; then
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)"
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs $jobs"
        # shellcheck disable=SC2086 # one job id per word
        timeout 10 scancel $jobs || true
        deadline=$((SECONDS + TIMEOUT))
        until [[ -z "$(timeout 10 squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null || true)" ]] ||
            ((SECONDS >= deadline)); do sleep 0.5; done
    fi
fi

for name in slurmd slurmctld slurmdbd mariadbd munged; do stop "$name"; done
[[ -e /run/munge/munged.pid ]] || rm -f /run/munge/munge.socket.2.lock

# Remove only the /etc/slurm links up.sh made, and only while they still point here.
if [[ -s "$DIR/links" ]]; then
    while read -r link; do
        if [[ -L "$link" && "$(readlink "$link")" == "$DIR/"* ]]; then
            rm -f "$link"
            log "removed $link"
        fi
    done <"$DIR/links"
    rm -f "$DIR/links"
fi
log "down (state and logs kept in $DIR)"
