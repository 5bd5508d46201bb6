#!/bin/sh
# phonefit's batch runner: benchmarks every model of one batch on the phone.
#
#   sh run_batch.sh BATCH_DIR BENCHMARK_MODEL TIMEOUT_S COOLDOWN_S CPU_MASK TAG [FLAG ...]
#
# BATCH_DIR/models/batch.tar holds the batch's models in one POSIX (ustar) archive, in the
# order they are to be measured: pushing one file instead of one per model saves a round
# trip per model.  The runner first checks the archive's listing: every member must be a
# regular file named NAME.tflite, NAME of [A-Za-z0-9._-] not starting with a dot (so no
# directory, absolute path, `..`, link or device, and never batch.tar itself), else it
# stops with PHONEFIT_ERROR before anything is unpacked.  Then it unpacks the archive
# next to itself, into BATCH_DIR/models/ (one `tar` process for the whole batch), and
# writes the member names to BATCH_DIR/list.txt; BATCH_DIR/unpacked marks that done.  For
# each model, in order, it runs
#     timeout [--foreground] -k 2 TIMEOUT_S [taskset CPU_MASK] BENCHMARK_MODEL --graph=BATCH_DIR/models/NAME FLAG...
# and appends one record to BATCH_DIR/records.txt:
#     PHONEFIT_BEGIN TAG NAME
#     <everything benchmark_model printed, stdout and stderr>
#     PHONEFIT_END TAG NAME STATUS
# STATUS is benchmark_model's exit status (124 or 137: killed at the timeout; above 128:
# killed by signal STATUS-128).  adb's shell service reports no exit status, so the
# records carry it.  A record without its END line was cut off and does not count.
#
# Resuming: each model's name is appended to BATCH_DIR/done.txt once its record is
# complete, so running the same command again (after the connection dropped) goes on at
# the first unmeasured model.  A runner still alive from the dropped connection holds
# BATCH_DIR/lock (its pid); the new one waits for it.  Between two measured models the
# runner sleeps COOLDOWN_S seconds (0: none).  CPU_MASK "-" means no pinning.
#
# Hang-up: when the connection drops, the phone hangs up the shell's process group.
# timeout normally moves itself and the benchmark into a process group of their own,
# which would outlive the runner and go on measuring next to the resumed one; so the
# runner uses `timeout --foreground` (toybox and GNU) where the phone's timeout has it,
# found out once per session (SESSION_DIR/timeout_foreground, SESSION_DIR being the
# parent of BATCH_DIR).
#
# Standard output: PHONEFIT_ALIVE every 10 seconds (so the host can tell a slow batch from
# a dead link), PHONEFIT_WAIT while waiting for an older runner, PHONEFIT_BATCH_DONE at
# the end, PHONEFIT_ERROR on a setup problem (exit 3).  Per model the loop forks only
# timeout (and taskset), and writes records and done.txt through descriptors opened once:
# what a batch saves over one shell per model is not spent again on bookkeeping.
#
# The runner removes nothing: the host removes the session's batches between batches,
# never while one is measured (profiler/adb.py).
#
# POSIX sh only (runs on Android's mksh and on dash); external commands: tar twice per
# batch; timeout, taskset, sleep and the benchmark per model.

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
models=$batch/models
set -f  # no globbing anywhere: names come from the archive
nl='
'

fail() {
    echo "PHONEFIT_ERROR $*"
    exit 3
}

# One line of `tar -tvf`, split into fields: a regular file (mode starting with `-`) with
# a safe name has exactly six (mode, owner/group, size, date, time, name) with GNU tar
# and toybox tar alike; a link adds "-> target" or "link to target".  Sets `member`.
# (NAME.tflite only: the archive itself, models/batch.tar, is never overwritten.)
check_member() {
    [ "$#" -eq 6 ] || return 1
    case "$1" in -*) ;; *) return 1 ;; esac
    case "$6" in
        .* | *[!A-Za-z0-9._-]*) return 1 ;;
        *.tflite) member=$6 ;;
        *) return 1 ;;
    esac
}

# Checks the archive, writes list.txt, unpacks; sets `names` (one per line).  Lines are
# taken from a variable, not with `read`: dash's read costs a system call per byte.
unpack() {
    archive=$models/batch.tar
    [ -f "$archive" ] || fail "no batch archive at $archive"
    command -v tar >/dev/null 2>&1 || fail "the phone has no tar command (toybox tar)"
    listing=$(tar -tvf "$archive" 2>&1) || fail "cannot list $archive: $listing"
    names=
    IFS=$nl
    for line in $listing; do
        IFS=' '
        # shellcheck disable=SC2086  # split on purpose (globbing is off)
        check_member $line || fail "refusing $archive: member '$line' is not a plain .tflite file with a safe name"
        names=$names$member$nl
    done
    unset IFS
    printf '%s' "$names" > "$batch/list.txt" || fail "cannot write to $batch"
    # -o: no ownership from the archive; -m: no mtimes (one system call less per model)
    tar -x -o -m -f "$archive" -C "$models" || fail "cannot unpack $archive into $models"
    : > "$batch/unpacked"
}

# Sets `foreground` to "--foreground" where timeout has it, else to nothing.
find_foreground() {
    answer=${batch%/*}/timeout_foreground
    if [ ! -f "$answer" ]; then
        if timeout --foreground 5 sleep 0 < /dev/null > /dev/null 2>&1; then
            echo "--foreground" > "$answer"
        else
            echo > "$answer"
        fi
    fi
    foreground=
    read -r foreground < "$answer"
}

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

if [ -f "$batch/unpacked" ]; then  # resumed: the list is there
    names=
    while IFS= read -r name; do names=$names$name$nl; done < "$batch/list.txt"
else
    unpack
fi
find_foreground
# Names already measured, each between spaces (read after taking the lock: final).
finished=
if [ -s "$batch/done.txt" ]; then
    while IFS= read -r name; do finished="$finished $name "; done < "$batch/done.txt"
fi
printf '' >> "$batch/records.txt" && printf '' >> "$batch/done.txt" || fail "cannot write to $batch"
exec 3>> "$batch/records.txt" 4>> "$batch/done.txt"

measured=0
IFS=$nl
for name in $names; do
    unset IFS
    if [ -n "$finished" ]; then
        case "$finished" in *" $name "*) continue ;; esac
    fi
    if [ "$measured" -gt 0 ] && [ "$cooldown_s" != 0 ]; then
        sleep "$cooldown_s"
    fi
    # The newline first ends a record that a killed runner left unfinished.
    printf '\nPHONEFIT_BEGIN %s %s\n' "$tag" "$name" >&3
    # $foreground unquoted: it is one word or none (and globbing is off).
    if [ "$mask" = "-" ]; then
        timeout $foreground -k 2 "$timeout_s" "$bench" "--graph=$models/$name" "$@" >&3 2>&3 < /dev/null
    else
        timeout $foreground -k 2 "$timeout_s" taskset "$mask" "$bench" "--graph=$models/$name" "$@" >&3 2>&3 < /dev/null
    fi
    status=$?
    printf '\nPHONEFIT_END %s %s %s\n' "$tag" "$name" "$status" >&3
    printf '%s\n' "$name" >&4
    measured=$((measured + 1))
done
unset IFS
echo "PHONEFIT_BATCH_DONE"
