#!/bin/sh
# phonefit's batch runner: benchmarks every model of one batch on the phone.
#
#   sh run_batch.sh BATCH_DIR BENCHMARK_MODEL TIMEOUT_S COOLDOWN_S CPU_MASK TAG [FLAG ...]
#
# BATCH_DIR holds list.txt (one model file name per line, names of [A-Za-z0-9._-]) and
# models/.  For each model, in order, the runner runs
#     timeout TIMEOUT_S [taskset CPU_MASK] BENCHMARK_MODEL --graph=BATCH_DIR/models/NAME FLAG...
# and appends one record to BATCH_DIR/records.txt:
#     PHONEFIT_BEGIN TAG NAME
#     <everything benchmark_model printed, stdout and stderr>
#     PHONEFIT_END TAG NAME STATUS
# STATUS is benchmark_model's exit status (124 or 137: killed at the timeout; above 128:
# killed by signal STATUS-128).  adb's shell service reports no exit status, so the
# records carry it.  A record without its END line was cut off and does not count.
#
# Resuming: BATCH_DIR/models/NAME.done marks a finished model, so running the same
# command again (after the connection dropped) goes on at the first unmeasured model.  A
# runner still alive from the dropped connection holds BATCH_DIR/lock (its pid); the new
# one waits for it.  Between two measured models it sleeps COOLDOWN_S seconds (0: none).
# CPU_MASK "-" means no pinning.
#
# Standard output: PHONEFIT_ALIVE every 10 seconds (so the host can tell a slow batch from
# a dead link), PHONEFIT_WAIT while waiting for an older runner, PHONEFIT_BATCH_DONE at
# the end, PHONEFIT_ERROR on a setup problem (exit 3).  Per model the loop forks only
# timeout (and taskset): no external command for bookkeeping, which is what a batch
# saves over one shell per model.
#
# POSIX sh only (runs on Android's mksh and on dash); external commands: timeout, taskset,
# sleep, the benchmark itself.

if [ "$#" -lt 6 ]; then
    echo "PHONEFIT_ERROR usage: run_batch.sh BATCH_DIR BENCHMARK_MODEL TIMEOUT_S COOLDOWN_S CPU_MASK TAG [FLAG ...]"
    exit 3
fi
batch=$1
bench=$2
timeout_s=$3
cooldown_s=$4
mask=$5
tag=$6
shift 6

fail() {
    echo "PHONEFIT_ERROR $*"
    exit 3
}

[ -f "$batch/list.txt" ] || fail "no list of models at $batch/list.txt"
[ -x "$bench" ] || fail "benchmark_model at $bench is missing or not executable"
command -v timeout >/dev/null 2>&1 || fail "the phone has no timeout command (toybox timeout, Android 6 or later)"
if [ "$mask" != "-" ]; then
    command -v taskset >/dev/null 2>&1 || fail "the phone has no taskset command, needed for CPU mask $mask"
fi

# One runner per batch.  The lock holds the pid of its runner; empty or with a dead pid
# it is free (a runner killed by a signal cannot clear it).  The host starts one runner
# at a time, so taking a free lock needs no atomic step.
while :; do
    holder=
    [ -s "$batch/lock" ] && read -r holder < "$batch/lock"
    if [ -n "$holder" ] && [ "$holder" != "$$" ] && kill -0 "$holder" 2>/dev/null; then
        echo "PHONEFIT_WAIT $holder"
        sleep 1
    else
        break
    fi
done
echo "$$" > "$batch/lock" || fail "cannot write to $batch"

# The heartbeat dies with the runner: killed at the end, or by SIGPIPE once the host is gone.
# (sleep's output goes elsewhere: it must not hold the host's pipe open after the end.)
(while sleep 10 < /dev/null > /dev/null 2>&1; do echo "PHONEFIT_ALIVE"; done) &
heartbeat=$!
# Only EXIT: trapping signals makes dash wait for each child more slowly.
trap 'kill "$heartbeat" 2>/dev/null; : > "$batch/lock"' EXIT

measured=0
while IFS= read -r name || [ -n "$name" ]; do
    [ -n "$name" ] || continue
    [ -f "$batch/models/$name.done" ] && continue
    if [ "$measured" -gt 0 ] && [ "$cooldown_s" != 0 ]; then
        sleep "$cooldown_s"
    fi
    # The newline first ends a record that a killed runner left unfinished.
    printf '\nPHONEFIT_BEGIN %s %s\n' "$tag" "$name" >> "$batch/records.txt"
    if [ "$mask" = "-" ]; then
        timeout -k 2 "$timeout_s" "$bench" "--graph=$batch/models/$name" "$@" \
            >> "$batch/records.txt" 2>&1 < /dev/null
    else
        timeout -k 2 "$timeout_s" taskset "$mask" "$bench" "--graph=$batch/models/$name" "$@" \
            >> "$batch/records.txt" 2>&1 < /dev/null
    fi
    status=$?
    printf '\nPHONEFIT_END %s %s %s\n' "$tag" "$name" "$status" >> "$batch/records.txt"
    : > "$batch/models/$name.done"
    measured=$((measured + 1))
done < "$batch/list.txt"
echo "PHONEFIT_BATCH_DONE"
