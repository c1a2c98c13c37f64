#!/usr/bin/env bash
# The checks of bin/systemd-test. Runs inside its container, as root, as a
# oneshot unit under systemd (PID 1), from a copy of the repository laid out
# as here (with the binary under test as target/release/forkd):
#
#   tests/systemd/checks.sh RESULTS_DIR
#
# Each check appends "PASS NAME: detail" or "FAIL NAME: detail" (with
# indented detail lines after it) to RESULTS_DIR/checks.txt and goes on to
# the next one. At the end it writes forkd's journal to RESULTS_DIR/journal.txt
# and creates RESULTS_DIR/done. Every wait is a bounded poll, every request
# loop is bounded in count and time.
set -uo pipefail

results=$(realpath -- "${1:?usage: checks.sh RESULTS_DIR}")
cd "$(dirname "$0")/../.."
mkdir -p "$results"
: >"$results/checks.txt"
touch "$results/started"

CONF=/etc/forkd/forkd.toml
CLI=/usr/local/bin/forkd # the CLI used by the checks; a copy while /usr/local/bin/forkd is broken

now_ms() { echo $(($(date +%s%N) / 1000000)); }
oneline() { tr '\n' ' ' | sed 's/ *$//'; }

# wait_for SECONDS CMD...: run CMD every 0.2 s until it succeeds; 1 if it
# never did within SECONDS.
wait_for() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    while :; do
        "$@" && return 0
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# js EXPR: evaluate the Python expression EXPR on the JSON document on stdin
# (bound to d); lists are printed space-separated.
js() {
    python3 -c '
import json, sys
d = json.load(sys.stdin)
r = eval(sys.argv[1])
print(" ".join(map(str, r)) if isinstance(r, (list, tuple, set)) else r)' "$1"
}

status_json() { timeout 10 "$CLI" --config "${1:-$CONF}" status --json 2>&1; }
# st EXPR [CONF]: one value out of `forkd status --json`.
st() { status_json "${2:-$CONF}" | js "$1" 2>/dev/null; }
ready_pids() { st "sorted(w['pid'] for w in d['workers'] if w['state'] == 'ready')" "${1:-$CONF}"; }
all_pids() { st "sorted(w['pid'] for w in d['workers'])" "${1:-$CONF}"; }
main_pid() { systemctl show -p MainPID --value "${1:-forkd.service}"; }
nrestarts() { systemctl show -p NRestarts --value "${1:-forkd.service}"; }
active() { [ "$(systemctl is-active "${1:-forkd.service}")" = active ]; }
healthz() { curl -fsS --max-time 5 "http://127.0.0.1:${1:-8080}/healthz" 2>&1; }
healthz_ok() { healthz "${1:-8080}" >/dev/null; }
all_ready() { # [CONF]
    local s
    s=$(status_json "${1:-$CONF}") || return 1
    [ "$(js "d['workers_ready'] == d['workers_wanted'] and d['workers_wanted'] > 0" <<<"$s" 2>/dev/null)" = True ]
}
serving() { active "${2:-forkd.service}" && healthz_ok "${1:-8080}" && all_ready "${3:-$CONF}"; }
none_alive() { # PID...: none of them is a live process
    local p
    for p in "$@"; do
        [ -e "/proc/$p" ] && return 1
    done
    return 0
}
disjoint() { # "A..." "B...": no word of A is in B
    local a
    for a in $1; do
        [[ " $2 " == *" $a "* ]] && return 1
    done
    return 0
}
pid_changed() { # UNIT OLD_PID: MainPID is a new, nonzero one
    local p
    p=$(main_pid "$1")
    [ -n "$p" ] && [ "$p" != 0 ] && [ "$p" != "$2" ]
}

# --- request loops: new connection per request, bounded in count and time.
# load_start NAME PORT MAX_REQUESTS MAX_SECONDS: in the background; the
# counts "ok failed" are in $results/NAME.load after every request, the
# failures' details in $results/NAME.err. load_stop NAME waits for it to end.
declare -A load_pids
load_start() {
    local name=$1 port=$2 max=$3 secs=$4
    rm -f "$results/$name.stop" "$results/$name.err" "$results/$name.spans"
    echo "0 0 0" >"$results/$name.load"
    (
        ok=0 failed=0 slowest=0 end=$(($(now_ms) + secs * 1000))
        for i in $(seq "$max"); do
            [ -e "$results/$name.stop" ] && break
            [ "$(now_ms)" -lt "$end" ] || break
            t0=$(now_ms)
            code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 \
                -H 'Connection: close' "http://127.0.0.1:$port/healthz" 2>"$results/$name.curl")
            t=$(($(now_ms) - t0))
            [ "$t" -le "$slowest" ] || slowest=$t
            if [ "$code" = 200 ]; then
                ok=$((ok + 1))
            else
                failed=$((failed + 1))
                echo "request $i at $(date +%T.%N | cut -c1-12) after $t ms: http $code $(oneline <"$results/$name.curl")" >>"$results/$name.err"
                echo "$t0 $((t0 + t))" >>"$results/$name.spans"
            fi
            echo "$ok $failed $slowest" >"$results/$name.load.tmp"
            mv "$results/$name.load.tmp" "$results/$name.load"
            sleep 0.02
        done
    ) &
    load_pids[$name]=$!
}
load_ok() { read -r o _ <"$results/$1.load" && echo "$o"; }
load_at_least() { [ "$(load_ok "$1")" -ge "$2" ]; } # NAME N: N requests succeeded
load_stop() {
    touch "$results/$1.stop"
    wait "${load_pids[$1]}" 2>/dev/null
    read -r load_good load_bad load_slowest <"$results/$1.load"
}
# load_failed NAME: bad() unless every request of the loop succeeded.
load_failed() {
    local e
    if [ "$load_bad" != 0 ]; then
        bad "$load_bad of $((load_good + load_bad)) requests failed; the first ones:"
        while IFS= read -r e; do bad "  $e"; done < <(head -n 3 "$results/$1.err")
    fi
    note "$load_good requests ok, $load_bad failed, the slowest took ${load_slowest:-?} ms"
}

# load_failed_across NAME FROM TO: like load_failed, but a SIGKILL sent
# between FROM and TO (ms) may cost the one request then in flight: the
# workers die with the supervisor, and the loop sends one at a time. So
# one failed request is let pass if it overlaps that moment (TO plus
# 500 ms, for the workers' death on a loaded machine).
load_failed_across() {
    local start end
    if [ "$load_bad" = 1 ] && read -r start end <"$results/$1.spans" &&
        [ "$start" -le $(($3 + 500)) ] && [ "$end" -ge "$2" ]; then
        note "the one request in flight at the kill failed: $(head -n 1 "$results/$1.err")"
        load_bad=0
    fi
    load_failed "$1"
}

write_journal() {
    journalctl -b --no-pager -u 'forkd*' >"$results/journal.txt" 2>&1
    journalctl -b --no-pager -n 400 >"$results/journal-all.txt" 2>&1
}
# Also when stopped before the end (the unit's TimeoutStartSec).
trap write_journal EXIT
trap 'exit 143' TERM

# --- checks
npass=0
nfail=0
check() { # NAME FUNCTION: run FUNCTION, which calls bad/note
    local name=$1 t0 took cursor
    problems=()
    notes=()
    t0=$(now_ms)
    cursor=$(journalctl -n 0 --show-cursor 2>/dev/null | sed -n 's/^-- cursor: //p')
    echo "== check: $name"
    echo "$name" >"$results/current"
    "$2"
    took=$((($(now_ms) - t0) / 100))
    took="$((took / 10)).$((took % 10))s"
    if [ ${#problems[@]} = 0 ]; then
        npass=$((npass + 1))
        local joined="" n
        for n in "${notes[@]}"; do joined+="${joined:+; }$n"; done
        printf 'PASS %s (%s): %s\n' "$name" "$took" "$joined" | tee -a "$results/checks.txt"
    else
        nfail=$((nfail + 1))
        {
            printf 'FAIL %s (%s): %s\n' "$name" "$took" "${problems[0]}"
            printf '%s\n' "${problems[@]:1}" "${notes[@]}" | sed '/^$/d; s/^/    /'
            echo "    journal of forkd* during this check (last 30 lines):"
            journalctl --no-pager -o short-precise ${cursor:+--after-cursor="$cursor"} -u 'forkd*' -n 30 2>&1 |
                sed 's/^/    | /'
        } | tee -a "$results/checks.txt"
    fi
}
bad() { problems+=("$*"); }
note() { notes+=("$*"); }

# docs/systemd.md's sh block number N (from 1) of the section whose heading
# is SECTION, a line per command, comments and trailing blanks dropped.
doc_block() { # SECTION N
    awk -v want="$2" -v sec_name="$1" '
        $0 == sec_name {sec = 1; next}
        sec && /^## / {exit}
        sec && /^```sh/ {n++; blk = (n == want); next}
        blk && /^```/ {exit}
        blk {print}' docs/systemd.md |
        while IFS= read -r line; do
            line=${line%%#*}
            line=${line%"${line##*[![:space:]]}"}
            [ -n "$line" ] && printf '%s\n' "$line"
        done
}

# Runs one line of the docs as written, from the repository root, into
# $results/docs.log; sets doc_out and doc_ms, and calls bad unless it
# exits 0.
run_doc_line() { # LINE
    local t0 rc
    t0=$(now_ms)
    doc_out=$(timeout 120 bash -c "$1" 2>&1 </dev/null)
    rc=$?
    doc_ms=$(($(now_ms) - t0))
    { echo "\$ $1  (exit $rc, ${doc_ms} ms)"; echo "$doc_out"; } >>"$results/docs.log"
    [ "$rc" = 0 ] || bad "docs/systemd.md line '$1' exited $rc: $(tail -n 3 <<<"$doc_out" | oneline)"
    return "$rc"
}

# 1. docs/systemd.md's install block, line by line, from the repository root.
check_install() {
    local lines line h s
    lines=$(doc_block '## Running under systemd' 1)
    if ! grep -qx 'systemctl enable --now forkd' <<<"$lines"; then
        bad "docs/systemd.md's 'Running under systemd' has no sh block with 'systemctl enable --now forkd'; installing by hand"
        lines=$'install -m 0755 target/release/forkd /usr/local/bin/forkd\ninstall -m 0644 -D config/forkd.toml /etc/forkd/forkd.toml\nuseradd --system --no-create-home --shell /usr/sbin/nologin forkd\ninstall -m 0644 systemd/forkd.service systemd/forkd@.service systemd/forkd.socket /etc/systemd/system/\nsystemctl daemon-reload\nsystemctl enable --now forkd'
    fi
    while IFS= read -r line; do
        run_doc_line "$line"
        if [ "$line" = "systemctl enable --now forkd" ]; then
            note "enable --now took ${doc_ms} ms"
            # At once, no retry: enable --now returns when READY=1 came,
            # which must mean every worker serves.
            if h=$(healthz); then
                note "healthz at once: $h"
            else
                bad "right after 'systemctl enable --now forkd' returned, /healthz failed: $h"
            fi
            s=$(status_json)
            # Not a condition of this check, for the record: whether the
            # workers reached the managed redis-server by then.
            note "readyz at once: $(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:8080/readyz 2>&1)"
            if [ "$(js "d['workers_ready'] == d['workers_wanted'] > 0" <<<"$s" 2>/dev/null)" = True ]; then
                note "workers $(js "'%d/%d' % (d['workers_ready'], d['workers_wanted'])" <<<"$s") ready at once"
            else
                bad "right after 'systemctl enable --now forkd' returned, not every worker was ready: $s"
            fi
        fi
    done <<<"$lines"
    active || bad "forkd.service is $(systemctl is-active forkd.service), not active"
    [ "$(systemctl is-enabled forkd.service)" = enabled ] || bad "forkd.service is $(systemctl is-enabled forkd.service), not enabled"
    note "MainPID $(main_pid), workers $(all_pids)"
}

# 2. systemctl reload: same supervisor, every worker new.
check_reload() {
    local mp old new out rc
    wait_for 30 serving || bad "not serving before the reload"
    mp=$(main_pid)
    old=$(ready_pids)
    out=$(timeout 120 systemctl reload forkd 2>&1)
    rc=$?
    [ "$rc" = 0 ] || bad "systemctl reload forkd exited $rc: $out"
    [ "$(main_pid)" = "$mp" ] || bad "MainPID changed from $mp to $(main_pid)"
    # The old workers drain after their replacements are ready.
    if wait_for 30 eval 'new=$(all_pids) && [ -n "$new" ] && disjoint "$old" "$new" && all_ready'; then
        note "MainPID $mp kept; workers $old -> $new"
    else
        bad "workers did not all change within 30 s: before $old, now $(all_pids) ($(status_json | oneline))"
    fi
    healthz_ok || bad "/healthz after the reload: $(healthz)"
    active || bad "forkd.service is $(systemctl is-active forkd.service) after the reload"
}

# 3. A different build installed over the binary, then `forkd upgrade`.
check_upgrade() {
    local mp nr b0 b1 out rc h
    wait_for 30 serving || bad "not serving before the upgrade"
    mp=$(main_pid)
    nr=$(nrestarts)
    b0=$(st "d['build']")
    # The same program, another file: the build fingerprint is a hash of it.
    { cat /usr/local/bin/forkd; printf '\0forkd-test\0'; } >/root/forkd-new
    install -m 0755 /root/forkd-new /usr/local/bin/forkd
    out=$(timeout 120 "$CLI" --config "$CONF" upgrade 2>&1)
    rc=$?
    echo "$out" >"$results/upgrade.out"
    [ "$rc" = 0 ] || bad "forkd upgrade exited $rc: $(oneline <<<"$out")"
    [ "$(main_pid)" = "$mp" ] || bad "MainPID changed from $mp to $(main_pid)"
    [ "$(nrestarts)" = "$nr" ] || bad "NRestarts changed from $nr to $(nrestarts)"
    if wait_for 30 eval 'b1=$(st "d[\"build\"]") && [ -n "$b1" ] && [ "$b1" != "$b0" ] && all_ready'; then
        note "MainPID $mp kept; build $b0 -> $b1"
    else
        bad "status build is still '$(st "d['build']")' (was $b0), or not all ready"
    fi
    if h=$(healthz); then
        [[ "$h" == *"\"build\":\"$b1\""* ]] || bad "/healthz answers build other than $b1: $h"
    else
        bad "/healthz after the upgrade: $h"
    fi
    active || bad "forkd.service is $(systemctl is-active forkd.service) after the upgrade"
}

# 4. A broken file installed as the binary: the upgrade fails, forkd keeps
# serving with its previous binary, systemd sees nothing.
check_broken_upgrade() {
    local mp nr out rc
    wait_for 30 serving || bad "not serving before the broken upgrade"
    cp /usr/local/bin/forkd /root/forkd-cli
    CLI=/root/forkd-cli
    mp=$(main_pid)
    nr=$(nrestarts)
    printf '#!/bin/sh\nexit 1\n' >/root/forkd-broken
    install -m 0755 /root/forkd-broken /usr/local/bin/forkd
    load_start broken 8080 1500 30
    wait_for 10 load_at_least broken 5 || bad "the request loop got no answers before the upgrade"
    out=$(timeout 120 "$CLI" --config "$CONF" upgrade 2>&1)
    rc=$?
    echo "$out" >"$results/broken-upgrade.out"
    # A supervisor that died of it, or a restart, would show within a few
    # seconds: go on to at least 100 more requests, 200 in all.
    local seen
    seen=$(($(load_ok broken) + 100))
    [ "$seen" -ge 200 ] || seen=200
    wait_for 20 load_at_least broken "$seen"
    load_stop broken
    [ "$rc" = 1 ] || bad "forkd upgrade exited $rc, not 1: $(oneline <<<"$out")"
    [ -n "$out" ] || bad "forkd upgrade printed nothing"
    note "upgrade exited $rc: $(tail -n 2 <<<"$out" | oneline)"
    load_failed broken
    active || bad "forkd.service is $(systemctl is-active forkd.service), not active"
    [ "$(main_pid)" = "$mp" ] || bad "MainPID changed from $mp to $(main_pid)"
    [ "$(nrestarts)" = "$nr" ] || bad "NRestarts changed from $nr to $(nrestarts)"
    # Back to the good binary, and to a serving forkd whatever happened.
    install -m 0755 /root/forkd-cli /usr/local/bin/forkd
    CLI=/usr/local/bin/forkd
    if ! wait_for 10 serving; then
        note "forkd.service was $(systemctl is-active forkd.service); restarted it with the good binary"
        systemctl reset-failed forkd.service 2>/dev/null
        timeout 120 systemctl restart forkd.service
        wait_for 30 serving || bad "forkd does not serve again after reinstalling the good binary"
    fi
}

# 5. kill -9 of the supervisor: its workers go with it, systemd restarts it.
check_kill9() {
    local mp nr old redis
    wait_for 30 serving || bad "not serving before kill -9"
    mp=$(main_pid)
    nr=$(nrestarts)
    old=$(all_pids)
    redis=$(st "(d.get('redis') or {}).get('pid') or ''")
    kill -9 "$mp"
    # shellcheck disable=SC2086
    if wait_for 10 none_alive $old; then
        note "old workers $old gone"
    else
        bad "old workers still alive 10 s after kill -9 of $mp: $(for p in $old; do [ -e /proc/$p ] && echo "$p($(cat /proc/$p/comm))"; done)"
    fi
    # Not asked by the check, for the record: the managed redis-server.
    if [ -n "$redis" ]; then
        # shellcheck disable=SC2086
        if wait_for 10 none_alive $redis; then note "old redis-server $redis gone"; else note "old redis-server $redis still alive after 10 s"; fi
    fi
    local t0=$(now_ms)
    if wait_for 60 eval 'pid_changed forkd.service "$mp" && [ "$(nrestarts)" -gt "$nr" ] && serving'; then
        note "restarted in $(($(now_ms) - t0)) ms: MainPID $mp -> $(main_pid), NRestarts $nr -> $(nrestarts)"
    else
        bad "no serving restart within 60 s: MainPID $(main_pid), NRestarts $(nrestarts) (was $mp, $nr), $(systemctl is-active forkd.service)"
    fi
}

# 6. Every worker stopped: the watchdog is not fed, systemd restarts forkd.
check_watchdog() {
    local mp nr pids t0 ms p wd
    # worker_timeout (default 30 s) would make the supervisor replace the
    # stopped workers itself, which feeds the watchdog again; it is longer
    # than WatchdogSec=10 (and the heartbeat goes stale after about two
    # heartbeat intervals), so with the default configuration the watchdog
    # fires first and worker_timeout needs no change for this check.
    wait_for 30 serving || bad "not serving before the watchdog check"
    mp=$(main_pid)
    nr=$(nrestarts)
    pids=$(ready_pids)
    [ -n "$pids" ] || bad "no ready workers to stop"
    t0=$(now_ms)
    for p in $pids; do kill -STOP "$p"; done
    if wait_for 90 eval 'pid_changed forkd.service "$mp" && [ "$(nrestarts)" -gt "$nr" ]'; then
        ms=$(($(now_ms) - t0))
        note "restarted ${ms} ms after SIGSTOP of $pids: MainPID $mp -> $(main_pid), NRestarts $nr -> $(nrestarts)"
    else
        bad "no restart within 90 s of SIGSTOP of every worker ($pids): MainPID $(main_pid), NRestarts $(nrestarts)"
    fi
    for p in $pids; do kill -CONT "$p" 2>/dev/null; done
    wd=$(journalctl -b --no-pager -o cat -u forkd.service 2>/dev/null | grep -i 'watchdog timeout' | tail -n 1)
    if [ -n "$wd" ]; then note "systemd: $wd"; else bad "no 'Watchdog timeout' in forkd.service's journal"; fi
    # shellcheck disable=SC2086
    wait_for 10 none_alive $pids || bad "stopped workers still alive: $pids"
    wait_for 60 serving || bad "forkd does not serve again after the watchdog restart"
}

# 7. Socket activation: systemd holds the port across a kill of forkd.
check_socket() {
    local out rc mp nr t0 after killed
    timeout 120 systemctl disable --now forkd.service >/dev/null 2>&1 || bad "systemctl disable --now forkd.service failed"
    wait_for 30 eval '! active forkd.service && ! healthz_ok' || bad "forkd.service still $(systemctl is-active forkd.service) / port 8080 still answering"
    out=$(timeout 60 systemctl enable --now forkd.socket 2>&1)
    rc=$?
    [ "$rc" = 0 ] || bad "systemctl enable --now forkd.socket exited $rc: $out"
    active forkd.socket || bad "forkd.socket is $(systemctl is-active forkd.socket)"
    active forkd.service && bad "forkd.service is active before the first request"
    t0=$(now_ms)
    out=$(curl -fsS --max-time 30 http://127.0.0.1:8080/healthz 2>&1) ||
        bad "the first request did not start forkd: $out"
    note "first request answered in $(($(now_ms) - t0)) ms"
    # The first worker may answer before every worker is ready and forkd
    # has sent READY=1 (the service is "activating" until then).
    wait_for 30 serving || bad "not serving after socket activation: forkd.service $(systemctl is-active forkd.service)"
    mp=$(main_pid)
    nr=$(nrestarts)
    load_start socket 8080 3000 90
    wait_for 10 load_at_least socket 20 || bad "the request loop got no answers before the kill"
    t0=$(now_ms)
    systemctl kill --kill-who=main -s KILL forkd.service || bad "systemctl kill failed"
    killed=$(now_ms)
    if wait_for 60 eval 'pid_changed forkd.service "$mp" && active forkd.service'; then
        note "MainPID $mp -> $(main_pid) after $(($(now_ms) - t0)) ms, NRestarts $nr -> $(nrestarts)"
    else
        bad "no new MainPID within 60 s (MainPID $(main_pid), $(systemctl is-active forkd.service), socket $(systemctl is-active forkd.socket))"
    fi
    after=$(load_ok socket)
    wait_for 30 load_at_least socket $((after + 40)) || bad "the request loop made no progress after the restart"
    load_stop socket
    load_failed_across socket "$t0" "$killed"
    [ "$(nrestarts)" -gt "$nr" ] || bad "NRestarts still $(nrestarts)"
    active forkd.socket || bad "forkd.socket is $(systemctl is-active forkd.socket) after the kill"
    healthz_ok || bad "/healthz after the restart: $(healthz)"
    timeout 120 systemctl stop forkd.socket forkd.service || bad "systemctl stop forkd.socket forkd.service failed"
    timeout 60 systemctl disable forkd.socket >/dev/null 2>&1
    wait_for 30 eval '! active forkd.service && ! active forkd.socket' || bad "forkd.service/socket still running after stop"
}

# 8. Two instances of forkd@.service side by side.
check_instances() {
    local n port out rc a b
    for n in a b; do
        port=$([ "$n" = a ] && echo 8081 || echo 8082)
        # instance names the pidfile, control socket and the managed
        # redis-server's socket (in the shared /run/forkd); the data
        # directory is the instance's own StateDirectory.
        printf 'instance = "%s"\nlisten = "127.0.0.1:%s"\n' "$n" "$port" >"/etc/forkd/$n.toml"
    done
    out=$(timeout 120 systemctl start forkd@a forkd@b 2>&1)
    rc=$?
    [ "$rc" = 0 ] || bad "systemctl start forkd@a forkd@b exited $rc: $out"
    active forkd@a.service || bad "forkd@a is $(systemctl is-active forkd@a.service)"
    active forkd@b.service || bad "forkd@b is $(systemctl is-active forkd@b.service)"
    a=$(main_pid forkd@a.service)
    b=$(main_pid forkd@b.service)
    [ "$a" != 0 ] && [ "$b" != 0 ] && [ "$a" != "$b" ] || bad "MainPIDs not distinct: a $a, b $b"
    for n in a b; do
        port=$([ "$n" = a ] && echo 8081 || echo 8082)
        out=$(healthz "$port") || bad "forkd@$n: /healthz on $port: $out"
        all_ready "/etc/forkd/$n.toml" || bad "forkd@$n: $(status_json "/etc/forkd/$n.toml" | oneline)"
        [ "$(st "d['instance']" "/etc/forkd/$n.toml")" = "$n" ] || bad "forkd@$n: status instance is '$(st "d['instance']" "/etc/forkd/$n.toml")'"
        [ "$(st "d['pid']" "/etc/forkd/$n.toml")" = "$(main_pid "forkd@$n.service")" ] || bad "forkd@$n: status pid is not its MainPID"
    done
    note "forkd@a MainPID $a on 8081, forkd@b MainPID $b on 8082"
    # They share /run/forkd with forkd.service: stopping that one must not
    # take their pidfiles, control and redis sockets with it.
    timeout 120 systemctl start forkd.service || bad "systemctl start forkd failed"
    timeout 120 systemctl stop forkd.service || bad "systemctl stop forkd failed"
    all_ready /etc/forkd/a.toml || bad "forkd@a after forkd.service stopped: $(status_json /etc/forkd/a.toml | oneline)"
    out=$(curl -fsS --max-time 5 http://127.0.0.1:8081/readyz 2>&1) || bad "forkd@a /readyz after forkd.service stopped: $out"
    timeout 120 systemctl stop forkd@a forkd@b || bad "systemctl stop forkd@a forkd@b failed"
    active forkd@a.service && bad "forkd@a still active after stop"
    active forkd@b.service && bad "forkd@b still active after stop"
}

# 9. docs/systemd.md's "Operate it" block, line by line, on the running
# service: reload, status, a user, a new binary and an upgrade, the
# journal, a stop.
check_operate() {
    local lines line mp b0 b1
    timeout 120 systemctl start forkd.service || bad "systemctl start forkd failed"
    wait_for 30 serving || bad "not serving before the docs' operations"
    lines=$(doc_block '## Running under systemd' 2)
    [ "$(tail -n 1 <<<"$lines")" = "systemctl stop forkd" ] ||
        bad "docs/systemd.md's second block does not end with 'systemctl stop forkd': $(oneline <<<"$lines")"
    mp=$(main_pid)
    while IFS= read -r line; do
        [ "$line" = "systemctl stop forkd" ] && { [ "$(main_pid)" = "$mp" ] || bad "MainPID changed from $mp to $(main_pid) before the stop"; }
        case "$line" in
        *" upgrade"*) b0=$(st "d['build']") ;;
        esac
        run_doc_line "$line" || continue
        case "$line" in
        *" status") [[ "$doc_out" == *", running, "* ]] || bad "'$line' printed no running instance: $(oneline <<<"$doc_out")" ;;
        *" user add "*) [[ "$doc_out" == *"user 'alice' added"* ]] || bad "'$line' printed: $(oneline <<<"$doc_out")" ;;
        *" upgrade"*)
            # The block installs target/release/forkd over the other build
            # of checks 3 and 4: the build changes.
            if wait_for 30 eval 'b1=$(st "d[\"build\"]") && [ -n "$b1" ] && [ "$b1" != "$b0" ] && all_ready'; then
                note "upgraded: build $b0 -> $b1"
            else
                bad "after '$line' the build is still '$(st "d['build']")' (was $b0), or not all ready"
            fi
            ;;
        "systemctl reload forkd") wait_for 30 all_ready || bad "not every worker ready after the reload" ;;
        journalctl*)
            # What the docs say of the journal: lines that name the
            # supervisor or a worker, with its pid (the upgrade just logged
            # some of the supervisor's).
            grep -Eq ' supervisor pid [0-9]+: ' <<<"$doc_out" ||
                bad "'$line' showed no 'supervisor pid N:' line: $(tail -n 5 <<<"$doc_out" | oneline)"
            ;;
        esac
    done <<<"$lines"
    active forkd.service && bad "forkd.service still active after the block's 'systemctl stop forkd'"
    note "$(grep -c . <<<"$lines") lines run"
}

# 10. The Debian package (bin/package), on a machine without forkd: the
# The docs' install of checks 1-9 is undone first, user included.
pkg_leftovers() { # what of forkd is on disk outside the test's own files
    find /etc /usr /lib /var/lib /var/log -name '*forkd*' -not -name 'test-forkd.*' \
        -not -path '/var/log/journal/*' 2>/dev/null | sort
}
check_package() {
    local next=/forkd-systemd-test/debs/forkd-next.deb
    local out rc mp nr b0 b1 u seen left lines install_line enable_line
    timeout 120 systemctl stop forkd.socket forkd.service 'forkd@*.service' >/dev/null 2>&1
    timeout 60 systemctl disable forkd.service forkd.socket >/dev/null 2>&1
    rm -f /etc/systemd/system/forkd.service /etc/systemd/system/forkd@.service /etc/systemd/system/forkd.socket \
        /usr/local/bin/forkd /root/forkd-*
    rm -rf /etc/forkd /var/lib/forkd /run/forkd
    systemctl daemon-reload
    wait_for 30 eval '! pgrep -u forkd >/dev/null' || bad "processes of user forkd left from checks 1-9: $(pgrep -a -u forkd | oneline)"
    userdel forkd 2>/dev/null
    groupdel forkd 2>/dev/null
    left=$(pkg_leftovers)
    [ -z "$left" ] || bad "before the install, left from checks 1-9: $(oneline <<<"$left")"
    CLI=/usr/bin/forkd

    # docs/systemd.md's package block: bin/systemd-test ran its first line
    # (bin/package) on the host and put the .deb where the second finds it.
    lines=$(doc_block '## Debian package' 1)
    install_line=$(sed -n 2p <<<"$lines")
    enable_line=$(sed -n 3p <<<"$lines")
    [ "$(sed -n 1p <<<"$lines")" = bin/package ] && [ "$(grep -c . <<<"$lines")" = 3 ] ||
        bad "docs/systemd.md's package block is not bin/package, an install and an enable: $(oneline <<<"$lines")"
    [[ "$install_line" == *"./target/debian/forkd_"*".deb"* ]] ||
        bad "docs/systemd.md's package block does not install ./target/debian/forkd_*.deb: $install_line"
    [ "$enable_line" = "systemctl enable --now forkd" ] ||
        bad "docs/systemd.md's package block does not end with 'systemctl enable --now forkd': $enable_line"
    run_doc_line "$install_line"
    echo "$doc_out" >"$results/dpkg-install.out"
    [ "$(dpkg-query -W -f='${Status}' forkd 2>&1)" = "install ok installed" ] ||
        bad "dpkg-query: $(dpkg-query -W -f='${Status}' forkd 2>&1)"
    u=$(getent passwd forkd)
    if [ -z "$u" ]; then
        bad "the package made no forkd user"
    else
        IFS=: read -r _ _ uid _ _ home shell <<<"$u"
        [ "$uid" -lt 1000 ] && [ "$shell" = /usr/sbin/nologin ] || bad "forkd user is not a system user without a shell: $u"
        note "user $u"
    fi
    dpkg-query -W -f='${Conffiles}' forkd | grep -q ' /etc/forkd/forkd.toml ' || bad "/etc/forkd/forkd.toml is not a conffile: $(dpkg-query -W -f='${Conffiles}' forkd | oneline)"
    # Installed, left to the admin: neither enabled nor started.
    [ "$(systemctl is-enabled forkd.service 2>&1)" = disabled ] || bad "after install forkd.service is $(systemctl is-enabled forkd.service 2>&1), not disabled"
    active forkd.service && bad "forkd.service runs right after the install"
    [[ "$(systemctl show -p ExecStart --value forkd.service)" == *"path=/usr/bin/forkd "* ]] ||
        bad "forkd.service does not run /usr/bin/forkd: $(systemctl show -p ExecStart --value forkd.service)"
    zcat /usr/share/man/man1/forkd.1.gz 2>/dev/null | grep -q '^\.SH SIGNALS' || bad "no forkd(1) with a SIGNALS section"
    zcat /usr/share/man/man1/forkd-user-add.1.gz 2>/dev/null | grep -q '^\.TH' || bad "no forkd-user-add(1)"
    out=$(bash -c '. /usr/share/bash-completion/completions/forkd && complete -p forkd' 2>&1) || bad "bash completion: $out"
    [ -s /usr/share/zsh/vendor-completions/_forkd ] && [ -s /usr/share/fish/vendor_completions.d/forkd.fish ] || bad "no zsh or fish completion"

    run_doc_line "$enable_line"
    wait_for 60 serving || bad "the packaged forkd does not serve: $(systemctl is-active forkd.service), $(healthz)"
    [ "$(st "d['pid']")" = "$(main_pid)" ] || bad "status pid $(st "d['pid']") is not MainPID $(main_pid)"

    # A newer package over a running forkd: postinst upgrades it in place.
    mp=$(main_pid)
    nr=$(nrestarts)
    b0=$(st "d['build']")
    echo '# edited by the admin' >>/etc/forkd/forkd.toml
    load_start pkg 8080 3000 120
    wait_for 10 load_at_least pkg 5 || bad "the request loop got no answers before the package upgrade"
    out=$(timeout 180 dpkg -i "$next" 2>&1)
    rc=$?
    echo "$out" >"$results/dpkg-upgrade.out"
    [ "$rc" = 0 ] || bad "dpkg -i forkd-next.deb exited $rc: $(tail -n 3 <<<"$out" | oneline)"
    grep -q 'instance forkd (pid [0-9]*) now runs the new binary' <<<"$out" || bad "postinst did not upgrade forkd.service: $(oneline <<<"$out")"
    wait_for 30 eval 'b1=$(st "d[\"build\"]") && [ -n "$b1" ] && [ "$b1" != "$b0" ] && all_ready' ||
        bad "status build is still '$(st "d['build']")' (was $b0), or not all ready"
    seen=$(($(load_ok pkg) + 100))
    wait_for 30 load_at_least pkg "$seen"
    load_stop pkg
    load_failed pkg
    [ "$(main_pid)" = "$mp" ] || bad "MainPID changed from $mp to $(main_pid) in the package upgrade"
    [ "$(nrestarts)" = "$nr" ] || bad "NRestarts changed from $nr to $(nrestarts) in the package upgrade"
    grep -qx '# edited by the admin' /etc/forkd/forkd.toml || bad "the package upgrade lost the admin's edit of /etc/forkd/forkd.toml"
    note "upgraded to $(dpkg-query -W -f='${Version}' forkd) in place: MainPID $mp kept, build $b0 -> $b1"

    out=$(timeout 180 dpkg -r forkd 2>&1)
    rc=$?
    echo "$out" >"$results/dpkg-remove.out"
    [ "$rc" = 0 ] || bad "dpkg -r forkd exited $rc: $(tail -n 3 <<<"$out" | oneline)"
    active forkd.service && bad "forkd.service still active after dpkg -r"
    wait_for 30 eval '! pgrep -u forkd >/dev/null' || bad "processes of user forkd after dpkg -r: $(pgrep -a -u forkd | oneline)"
    healthz_ok && bad "port 8080 still answers after dpkg -r"
    [ -e /usr/bin/forkd ] && bad "/usr/bin/forkd is still there after dpkg -r"
    [ -f /etc/forkd/forkd.toml ] || bad "dpkg -r took the conffile /etc/forkd/forkd.toml (only a purge should)"
    left=$(find /etc/systemd /lib/systemd -name '*forkd*' -not -name 'test-forkd.*' 2>/dev/null)
    [ -z "$left" ] || bad "units or enable links left after dpkg -r: $(oneline <<<"$left")"

    out=$(timeout 120 dpkg -P forkd 2>&1)
    rc=$?
    echo "$out" >"$results/dpkg-purge.out"
    [ "$rc" = 0 ] || bad "dpkg -P forkd exited $rc: $(tail -n 3 <<<"$out" | oneline)"
    dpkg-query -W -f='${Status}' forkd 2>/dev/null | grep -q 'installed' && bad "dpkg still knows forkd: $(dpkg-query -W -f='${Status}' forkd)"
    left=$(pkg_leftovers)
    [ -z "$left" ] || bad "left after dpkg -P: $(oneline <<<"$left")"
    [ -e /run/forkd ] && bad "/run/forkd left after dpkg -P"
    getent passwd forkd >/dev/null && note "the forkd user stays after purge, as Debian keeps system users"
}

check "1 install as docs/systemd.md says; enable --now returns once workers serve" check_install
check "2 systemctl reload: same MainPID, new workers" check_reload
check "3 upgrade to a new build: same MainPID, new build" check_upgrade
check "4 upgrade to a broken binary: exit 1, no failed request, no restart" check_broken_upgrade
check "5 kill -9 of the supervisor: workers gone, systemd restarts it" check_kill9
check "6 all workers SIGSTOPped: the watchdog restarts forkd" check_watchdog
check "7 socket activation: no failed request across a kill of forkd" check_socket
check "8 forkd@a and forkd@b side by side, and beside forkd.service" check_instances
check "9 operate it as docs/systemd.md says: reload, status, user add, upgrade, journal, stop" check_operate
check "10 the .deb: install, start, upgrade in place under load, remove, purge" check_package

echo "$npass $nfail" >"$results/done"
echo "== checks: $npass passed, $nfail failed"
exit 0
