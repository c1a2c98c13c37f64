"""forkd's benchmark, run by bin/bench: starts its own redis-server and
forkd instances on loopback, drives them with wrk for a bounded time per
scenario, and prints one table (and, with --json FILE, writes it).

Every figure comes from one run on one machine; compare scenarios within a
run. Nothing here asserts speed: the targets are reported as met or missed.
"""

import argparse
import http.server as httpserver
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

import bench_tls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORKD = os.path.join(ROOT, "target", "release", "forkd")
BARE = os.path.join(ROOT, "target", "release", "examples", "bare-hyper")
PASSWORD = "bench-password"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, limit=30.0, step=0.02):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise RuntimeError("timed out waiting for a condition")


class Redis:
    def __init__(self, tmp):
        self.port = free_port()
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir,
             "--logfile", "", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.cli("PING").strip() == "PONG")

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), *args],
                              capture_output=True, text=True).stdout

    def commandstats(self):
        """{command: (calls, usec)} from INFO commandstats."""
        stats = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", line)
            if m:
                stats[m.group(1)] = (int(m.group(2)), int(m.group(3)))
        return stats

    def cpu_seconds(self):
        """used_cpu_user + used_cpu_sys of the server so far."""
        info = self.cli("INFO", "cpu")
        return sum(float(v) for v in re.findall(r"used_cpu_(?:user|sys):([\d.]+)", info))

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Forkd:
    def __init__(self, tmp, name, redis, extra=""):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.port = free_port()
        self.config = os.path.join(self.dir, "forkd.toml")
        with open(self.config, "w") as f:
            f.write(f'instance = "{name}"\nlisten = "127.0.0.1:{self.port}"\n'
                    f'runtime_dir = "{self.dir}/run"\nlog_level = "warn"\n'
                    f'workers = 2\n{extra}\n')
        env = dict(os.environ, FORKD_REDIS_URL=f"redis://127.0.0.1:{redis.port}")
        env.pop("RUST_LOG", None)
        self.env = env
        self.log = open(os.path.join(self.dir, "forkd.log"), "w")
        self.proc = subprocess.Popen([FORKD, "--config", self.config, "start"],
                                     stdout=self.log, stderr=self.log, env=env)
        self.control = os.path.join(self.dir, "run", f"{name}.sock")
        try:
            wait_for(self.ready)
        except RuntimeError:
            time.sleep(0.2)
            with open(os.path.join(self.dir, "forkd.log")) as log:
                sys.stderr.write(log.read())
            raise RuntimeError(f"forkd '{name}' did not become ready (exit {self.proc.poll()})")

    def status(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(self.control)
                s.sendall(b'{"cmd":"status"}\n')
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            reply = json.loads(data)
            return reply if reply.get("reply") == "status" else None
        except (OSError, ValueError):
            return None

    def ready(self):
        s = self.status()
        return s if s and s["workers_ready"] == s["workers_wanted"] and \
            len(s["workers"]) == s["workers_wanted"] else None

    def cli(self, *args, stdin=None):
        return subprocess.run([FORKD, "--config", self.config, *args],
                              input=stdin, capture_output=True, text=True, env=self.env)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def rss(self):
        s = self.status()
        return s["rss_bytes"], [w["rss_bytes"] for w in s["workers"]]

    def stop(self):
        terminate(self.proc)
        self.log.close()


class Bare:
    """The reference: bare pre-fork hyper workers (benches/bare_hyper.rs),
    one a core, each binding the port with SO_REUSEPORT as forkd's
    reuseport listener does, with nothing of forkd's."""

    def __init__(self, workers):
        self.port = free_port()
        self.procs = [subprocess.Popen([BARE, f"127.0.0.1:{self.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for _ in range(workers)]

        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return all(p.poll() is None for p in self.procs)
            except OSError:
                return False
        wait_for(up)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        for p in self.procs:
            terminate(p)


def measure_bare(bare, seconds):
    """wrk against the bare workers, and their CPU per request."""
    ticks = {p.pid: cpu_ticks(p.pid) for p in bare.procs}
    result = wrk(bare.url("/healthz"), seconds)
    n = max(result.get("requests", 0), 1)
    used = sum(cpu_ticks(pid) - t for pid, t in ticks.items())
    print(f"  bare hyper: {result.get('rps', 0):.0f} req/s", file=sys.stderr)
    return {"scenario": "bare hyper worker (reference)", **result,
            "worker_cpu_us_per_req": used / TICK * 1e6 / n}


def terminate(proc):
    """SIGTERM, then SIGKILL after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http(method, port, path, body=None, headers=None):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = body.encode() if body else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        s.sendall(head.encode() + data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    status = int(out.split(b" ", 2)[1])
    return status, out.split(b"\r\n\r\n", 1)[1].decode()


class KeepAlive:
    """One keep-alive HTTP/1.1 connection: GETs with a bearer token, the
    status of each (bodies are short and Content-Length framed)."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def get(self, path, token):
        self.s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {token}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(self.buf) < length:
            self.buf += self.s.recv(65536)
        self.buf = self.buf[length:]
        return int(head.split(b" ", 2)[1])

    def close(self):
        self.s.close()


def revocation_ms(a, b, path, rounds):
    """Logs in on instance `a`, warms `b`'s near cache with the session
    (on one keep-alive connection, so one worker), logs out on `a`, and
    measures from the logout's answer to the first 401 on `b`, asking in a
    tight loop; `rounds` times. The ms of each (0 when `b` refused it
    before the logout's answer was read)."""
    out = []
    for _ in range(rounds):
        t = login_token(a, "bench")
        conn = KeepAlive(b.port)
        for _ in range(20):
            assert conn.get(path, t) == 200
        first = {}

        def probe():
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if conn.get(path, t) == 401:
                    first["at"] = time.monotonic()
                    return
        th = threading.Thread(target=probe)
        th.start()
        status, _ = http("POST", a.port, "/logout", headers={"Authorization": f"Bearer {t}"})
        answered = time.monotonic()
        assert status == 204, status
        th.join()
        conn.close()
        if "at" not in first:
            raise RuntimeError("the session outlived its logout on the other instance by 5 s")
        out.append(max(0.0, (first["at"] - answered) * 1000))
    return out


def login_token(f, user):
    body = json.dumps({"username": user, "password": PASSWORD})
    status, text = http("POST", f.port, "/login", body, {"Content-Type": "application/json"})
    assert status == 200, text
    return json.loads(text)["token"]


def wrk(url, seconds, connections=64, threads=2, headers=(), script=None):
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True).stdout

    def unit(value):
        m = re.match(r"([\d.]+)(us|ms|s)", value)
        if not m:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": unit(p50.group(1)) if p50 else None,
        "p99_ms": unit(p99.group(1)) if p99 else None,
        "requests": int(total.group(1)) if total else 0,
        "errors": errors,
    }


class SlowOrigin(httpserver.BaseHTTPRequestHandler):
    delay = 0.02
    calls = 0

    def do_GET(self):
        SlowOrigin.calls += 1
        time.sleep(self.delay)
        body = json.dumps({"name": self.path.rsplit("/", 1)[-1], "source": "origin"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ThreadedServer(socketserver.ThreadingMixIn, httpserver.HTTPServer):
    daemon_threads = True


class Nginx:
    """An nginx of the benchmark's own, in the foreground, ended by pid."""

    def __init__(self, tmp, name, server_blocks, workers):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        d = self.dir
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\n"
                    f"error_log {d}/error.log warn;\n"
                    "events { worker_connections 4096; }\n"
                    "http {\n    access_log off;\n    keepalive_requests 1000000;\n"
                    f"    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n"
                    f"    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n"
                    f"    scgi_temp_path {d}/scgi;\n{server_blocks}\n}}\n")
        self.proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", d, "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(self, port):
        def up():
            try:
                return http("GET", port, "/")[0] > 0
            except OSError:
                return False
        wait_for(up)

    def stop(self):
        terminate(self.proc)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as st:
            fields = st.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def sockets(pid):
    """Open sockets of a process."""
    try:
        return sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    except OSError:
        return 0


def measure(name, f, redis, run, seconds):
    """Runs `run` (a wrk call) and adds what it cost: Redis commands and
    microseconds per request (INFO commandstats, INFO cpu), worker CPU per
    request (/proc), and how requests and connections spread over the
    workers (connections counted halfway through the run)."""
    before = redis.commandstats()
    redis_cpu = redis.cpu_seconds()
    workers_before = {w["pid"]: w for w in f.status()["workers"]}
    idle_sockets = {pid: sockets(pid) for pid in workers_before}
    ticks = {pid: cpu_ticks(pid) for pid in workers_before}
    conns = {}
    sampler = threading.Timer(seconds / 2,
                              lambda: conns.update({pid: sockets(pid) - idle_sockets[pid]
                                                    for pid in idle_sockets}))
    sampler.start()
    result = run()
    sampler.cancel()
    redis_cpu = redis.cpu_seconds() - redis_cpu
    after = redis.commandstats()
    workers_after = {w["pid"]: w for w in f.status()["workers"]}
    delta = {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1])
             for k, (c, u) in after.items()}
    delta.pop("info", None)
    n = max(result.get("requests", 0), 1)
    served = [workers_after[p]["requests"] - w["requests"]
              for p, w in workers_before.items() if p in workers_after]
    worker_ticks = sum(cpu_ticks(p) - t for p, t in ticks.items())
    sup, workers = f.rss()
    row = {"scenario": name, **result,
           "redis_cmds_per_req": sum(c for c, _ in delta.values()) / n,
           "evalsha_per_req": delta.get("evalsha", (0, 0))[0] / n,
           "script_usec_per_call": (delta.get("evalsha", (0, 0))[1] /
                                    max(delta.get("evalsha", (0, 0))[0], 1)),
           "redis_cpu_us_per_req": redis_cpu * 1e6 / n,
           "worker_cpu_us_per_req": worker_ticks / TICK * 1e6 / n,
           "requests_per_worker": served,
           "connections_per_worker": [conns.get(p, 0) for p in workers_before],
           "rss_supervisor": sup, "rss_workers": workers}
    print(f"  {name}: {result.get('rps', 0):.0f} req/s", file=sys.stderr)
    return row


def total_rss(f):
    sup, workers = f.rss()
    return sup + sum(workers)


def settled_rss(f, limit=15.0):
    """Supervisor + workers RSS once it stops falling (a worker frees its
    hashing memory 2 s after its last password check)."""
    deadline = time.monotonic() + limit
    time.sleep(3.0)
    last = total_rss(f)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = total_rss(f)
        if now >= last:
            return now
        last = now
    return last


def spread(counts):
    """Least busy worker over most busy (1.0: even)."""
    return min(counts) / max(max(counts), 1) if counts else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a second or two per scenario")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    secs = 2 if args.quick else 10
    kills = 5 if args.quick else 20
    cores = os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="forkd-bench-")
    rows, notes = [], {}
    redis = Redis(tmp)
    origin = ThreadedServer(("127.0.0.1", 0), SlowOrigin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    started, nginxes = [], []
    try:
        high = ("[auth]\nlogin_ip_limit = 1000000\nlogin_user_limit = 1000000\n"
                "login_user_all_limit = 1000000\nlogin_host_limit = 1000000\n"
                "hash_queue_timeout = 10\n"
                "[rate_limit.profile]\nlimit = 1000000000\nwindow = 60\n")
        f = Forkd(tmp, "bench", redis, high)
        started.append(f)
        f.cli("user", "add", "bench", "--password-stdin", stdin=PASSWORD + "\n")
        notes["rss_idle"] = settled_rss(f)
        rows.append(measure("healthz", f, redis, lambda: wrk(f.url("/healthz"), secs), secs))
        # The same /healthz with each access log format written to a file:
        # what a line per request costs.
        for fmt_ in ("json", "combined"):
            a = Forkd(tmp, f"access-{fmt_}", redis, f'access_log = "{fmt_}"\n'
                      f'access_log_file = "{tmp}/access-{fmt_}.log"\n' + high.replace(
                          "[rate_limit.profile]",
                          f'[redis]\nprefix = "access-{fmt_}:"\n[rate_limit.profile]'))
            started.append(a)
            row = measure(f"healthz, access log {fmt_} to a file", a, redis,
                          lambda: wrk(a.url("/healthz"), secs), secs)
            a.stop()
            started.remove(a)
            # Counted once the workers have exited, which flushes the log.
            with open(f"{tmp}/access-{fmt_}.log", "rb") as lines:
                row["access_lines"] = sum(1 for _ in lines)
            rows.append(row)
        token = login_token(f, "bench")
        http("GET", f.port, "/profile", headers={"Authorization": f"Bearer {token}"})
        rows.append(measure("profile cache hit", f, redis, lambda: wrk(
            f.url("/profile"), secs, headers=[f"Authorization: Bearer {token}"]), secs))
        # The same with /profile's limit leased: 16 cells a Redis call.
        fl = Forkd(tmp, "bench-lease", redis, high.replace(
            "window = 60\n", "window = 60\nlease = 16\n"))
        started.append(fl)
        http("GET", fl.port, "/profile", headers={"Authorization": f"Bearer {token}"})
        rows.append(measure("profile cache hit, leased limit", fl, redis, lambda: wrk(
            fl.url("/profile"), secs, headers=[f"Authorization: Bearer {token}"]), secs))
        fl.stop()
        started.remove(fl)
        # HTTPS and HTTP/2 (bench_tls.py): the same Redis and sessions.
        bench_tls.run(sys.modules[__name__], tmp, redis, secs, high, token, rows, started,
                      nginxes)

        login_lua = os.path.join(tmp, "login.lua")
        with open(login_lua, "w") as lua:
            body = json.dumps({"username": "bench", "password": PASSWORD})
            lua.write('wrk.method = "POST"\n'
                      f"wrk.body = '{body}'\n"
                      'wrk.headers["Content-Type"] = "application/json"\n')
        # The ceiling: every core verifying, each verify as long as one
        # login alone takes (verify plus a few Redis round trips).
        one = wrk(f.url("/login"), secs, connections=1, threads=1, script=login_lua)
        verify_ms = one["p50_ms"] or 0
        ceiling = cores / (verify_ms / 1000.0) if verify_ms else 0
        notes["login_ceiling_rps"] = ceiling
        notes["login_single_p50_ms"] = verify_ms
        for name, headers in (("login, 64 keep-alive", []),
                              ("login, 64 new connections", ["Connection: close"])):
            # /healthz beside it, on 4 connections of their own: what the
            # hashing costs the event loops.
            beside = {}
            t = threading.Thread(target=lambda: beside.update(
                wrk(f.url("/healthz"), secs, connections=4, threads=1)))
            t.start()
            row = measure(name, f, redis, lambda: wrk(
                f.url("/login"), secs, connections=64, threads=2, script=login_lua,
                headers=headers), secs)
            t.join()
            row["ceiling_rps"] = ceiling
            row["ok_rps"] = (row["requests"] - row["errors"]) / secs
            row["healthz_beside_p99_ms"] = beside.get("p99_ms")
            rows.append(row)
        notes["rss_after_login"] = total_rss(f)
        notes["rss_idle_after_login"] = settled_rss(f)

        # Reload and kill -9 under load.
        bg = {}
        t = threading.Thread(target=lambda: bg.update(wrk(f.url("/healthz"), secs + 2)))
        t.start()
        time.sleep(1)
        t0 = time.monotonic()
        out = f.cli("reload")
        reload_s = time.monotonic() - t0
        t.join()
        rows.append({"scenario": "healthz during reload", **bg,
                     "reload_ok": out.returncode == 0, "reload_seconds": reload_s,
                     "rss_supervisor": f.rss()[0], "rss_workers": f.rss()[1]})

        times = []
        bg = {}
        t = threading.Thread(target=lambda: bg.update(wrk(f.url("/healthz"), secs + 2 * kills)))
        t.start()
        time.sleep(0.5)
        for i in range(kills):
            s = f.ready()
            victim = s["workers"][i % len(s["workers"])]
            # Kill a worker that has been up a while, as in production (one
            # that dies within a second of starting counts as a crash loop
            # and is restarted with backoff).
            wait_for(lambda: all(w["uptime_ms"] > 1500 for w in f.status()["workers"]))
            s = f.ready()
            victim = s["workers"][i % len(s["workers"])]
            start = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda: any(w["slot"] == victim["slot"] and w["pid"] != victim["pid"]
                                 and w["state"] == "ready" for w in f.status()["workers"]),
                     step=0.001)
            times.append((time.monotonic() - start) * 1000)
        t.join()
        times.sort()
        rows.append({"scenario": f"healthz during {kills} kill -9", **bg,
                     "replacement_ms_p50": times[len(times) // 2],
                     "replacement_ms_max": times[-1],
                     "rss_supervisor": f.rss()[0], "rss_workers": f.rss()[1]})
        f.stop()
        started.remove(f)

        # A cache that expires after 100 ms in front of a 20 ms origin: every
        # refill is a miss, and single flight makes concurrent misses share
        # one origin call.
        SlowOrigin.delay = 0.02
        SlowOrigin.calls = 0
        miss = Forkd(tmp, "miss", redis, high.replace(
            "[rate_limit.profile]",
            f'[profile]\norigin = "http://127.0.0.1:{origin.server_address[1]}"\n'
            'cache_ttl = 0.1\n[redis]\nprefix = "miss:"\n[rate_limit.profile]'))
        started.append(miss)
        miss.cli("user", "add", "bench", "--password-stdin", stdin=PASSWORD + "\n")
        token = login_token(miss, "bench")
        row = measure("profile, 100 ms TTL, 20 ms origin", miss, redis, lambda: wrk(
            miss.url("/profile"), secs, headers=[f"Authorization: Bearer {token}"]), secs)
        row["origin_calls"] = SlowOrigin.calls
        rows.append(row)
        miss.stop()
        started.remove(miss)

        # Listener modes.
        for mode in ("shared", "reuseport"):
            m = Forkd(tmp, f"mode-{mode}", redis, f'listener = "{mode}"\n'
                      + high.replace("[rate_limit.profile]",
                                     f'[redis]\nprefix = "{mode}:"\n[rate_limit.profile]'))
            started.append(m)
            row = measure(f"healthz, {mode} listener", m, redis,
                          lambda: wrk(m.url("/healthz"), secs), secs)
            row["spread_min_over_max"] = spread(row["requests_per_worker"])
            rows.append(row)
            if mode == "reuseport":
                # The reference beside it: bare hyper workers on a port of
                # their own, one a core, the same wrk run.
                bare = Bare(2)
                try:
                    rows.append(measure_bare(bare, secs))
                finally:
                    bare.stop()
                # The cache hit again, with the kernel spreading the
                # connections evenly over the workers.
                m.cli("user", "add", "bench", "--password-stdin", stdin=PASSWORD + "\n")
                t = login_token(m, "bench")
                http("GET", m.port, "/profile", headers={"Authorization": f"Bearer {t}"})
                rows.append(measure("profile cache hit, reuseport", m, redis, lambda: wrk(
                    m.url("/profile"), secs, headers=[f"Authorization: Bearer {t}"]), secs))
            m.stop()
            started.remove(m)

        # Proxying, the same trivial upstream in every row (nginx answering
        # 200 from memory, one worker): direct; through nginx proxy_pass
        # with upstream keep-alive (2 workers, as forkd); through forkd's
        # [[route]] anonymously and with a session check.
        up_port, via_port = free_port(), free_port()
        upstream = Nginx(tmp, "nginx-upstream",
                         f'    server {{ listen 127.0.0.1:{up_port}; '
                         f'location / {{ return 200 "ok\\n"; }} '
                         f'location /cacheable {{ add_header Cache-Control "private, max-age=600"; '
                         f'return 200 "ok\\n"; }} }}', 1)
        nginxes.append(upstream)
        upstream.wait(up_port)
        via = Nginx(tmp, "nginx-proxy",
                    f"    upstream app {{ server 127.0.0.1:{up_port}; keepalive 64; }}\n"
                    f"    server {{ listen 127.0.0.1:{via_port}; location / {{ proxy_pass http://app; "
                    'proxy_http_version 1.1; proxy_set_header Connection ""; } }', 2)
        nginxes.append(via)
        via.wait(via_port)
        rows.append({"scenario": "upstream direct (nginx, 1 worker)",
                     **wrk(f"http://127.0.0.1:{up_port}/x", secs)})
        rows.append({"scenario": "nginx proxy_pass, keep-alive upstream",
                     **wrk(f"http://127.0.0.1:{via_port}/x", secs)})
        p = Forkd(tmp, "proxy", redis, high.replace(
            "[rate_limit.profile]",
            f'[[route]]\nprefix = "/open"\nupstream = "http://127.0.0.1:{up_port}"\nauth = "none"\n'
            f'[[route]]\nprefix = "/app"\nupstream = "http://127.0.0.1:{up_port}"\n'
            'policies = ["bench"]\n'
            f'[[route]]\nprefix = "/sess"\nupstream = "http://127.0.0.1:{up_port}"\n'
            f'[[route]]\nprefix = "/leased"\nupstream = "http://127.0.0.1:{up_port}"\n'
            'policies = ["leased"]\n'
            f'[[route]]\nprefix = "/kept"\nupstream = "http://127.0.0.1:{up_port}"\n'
            'strip_prefix = true\ncache = true\n'
            '[rate_limit.policy.bench]\nlimit = 1000000000\nwindow = 60\nkey = "user"\n'
            '[rate_limit.policy.leased]\nlimit = 1000000000\nwindow = 60\nkey = "user"\n'
            'lease = 16\n'
            '[redis]\nprefix = "proxy:"\n[rate_limit.profile]'))
        started.append(p)
        p.cli("user", "add", "bench", "--password-stdin", stdin=PASSWORD + "\n")
        pt = login_token(p, "bench")
        rows.append(measure("forkd proxy, anonymous", p, redis,
                            lambda: wrk(p.url("/open/x"), secs), secs))
        rows.append(measure("forkd proxy, session only", p, redis, lambda: wrk(
            p.url("/sess/x"), secs, headers=[f"Authorization: Bearer {pt}"]), secs))
        rows.append(measure("forkd proxy, session auth and a policy", p, redis, lambda: wrk(
            p.url("/app/x"), secs, headers=[f"Authorization: Bearer {pt}"]), secs))
        rows.append(measure("forkd proxy, session and a leased policy", p, redis, lambda: wrk(
            p.url("/leased/x"), secs, headers=[f"Authorization: Bearer {pt}"]), secs))
        status, _ = http("GET", p.port, "/kept/cacheable", headers={"Authorization": f"Bearer {pt}"})
        assert status == 200, status
        rows.append(measure("forkd proxy, cached authenticated GET", p, redis, lambda: wrk(
            p.url("/kept/cacheable"), secs, headers=[f"Authorization: Bearer {pt}"]), secs))
        # Revocation across instances: a second one of the same config
        # (same Redis, same prefix) serves a session under load while the
        # first logs it out.
        q = Forkd(tmp, "proxy-two", redis, open(p.config).read().split("workers = 2\n", 1)[1])
        started.append(q)
        load = threading.Thread(target=lambda: wrk(
            q.url("/sess/x"), secs + 5, headers=[f"Authorization: Bearer {pt}"]))
        load.start()
        ms = sorted(revocation_ms(p, q, "/sess/x", 10 if args.quick else 50))
        load.join()
        rows.append({"scenario": "revocation on another instance, under load",
                     "revocation_ms": ms,
                     "p50_ms": ms[len(ms) // 2], "p99_ms": ms[min(len(ms) - 1, len(ms) * 99 // 100)]})
        q.stop()
        started.remove(q)
        p.stop()
        started.remove(p)
    finally:
        for f in started:
            f.stop()
        for n in nginxes:
            n.stop()
        origin.shutdown()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    report(rows, notes, cores, args)


def mib(b):
    return f"{b / 1048576:.1f}"


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def at_least(name, row, base, factor=1.0):
    """A target: `row` makes at least `factor` x the req/s of `base`."""
    return (name, row["rps"] >= factor * base["rps"],
            f"{row['rps'] / max(base['rps'], 1):.2f} x")


def report(rows, notes, cores, args):
    print(f"forkd bench: {cores} cores, wrk 2 threads x 64 connections unless noted, "
          f"{'quick' if args.quick else '10 s'} per scenario")
    header = (f"{'scenario':<36} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'redis cmds':>10} {'script us':>9} {'redis us':>8} {'worker us':>9}")
    print(header)
    print(f"{'':<36} {'':>9} {'':>7} {'':>7} {'':>6} {'per req':>10} {'per call':>9} "
          f"{'per req':>8} {'per req':>9}")
    print("-" * len(header))
    for r in rows:
        script = r.get("script_usec_per_call") if r.get("evalsha_per_req") else None
        print(f"{r['scenario']:<36} {r.get('rps', 0):>9.0f} {fmt(r.get('p50_ms')):>7} "
              f"{fmt(r.get('p99_ms')):>7} {r.get('errors', 0):>6} "
              f"{fmt(r.get('redis_cmds_per_req')):>10} {fmt(script, 1):>9} "
              f"{fmt(r.get('redis_cpu_us_per_req'), 1):>8} "
              f"{fmt(r.get('worker_cpu_us_per_req'), 1):>9}")
    print()
    print(f"{'scenario':<36} {'requests per worker':>22} {'connections per worker':>24} "
          f"{'sup MiB':>7} {'workers MiB':>13}")
    for r in rows:
        if "requests_per_worker" not in r:
            continue
        reqs = "/".join(str(n) for n in r["requests_per_worker"])
        conns = "/".join(str(n) for n in r["connections_per_worker"])
        workers = "+".join(mib(w) for w in r.get("rss_workers", []))
        print(f"{r['scenario']:<36} {reqs:>22} {conns:>24} "
              f"{mib(r.get('rss_supervisor', 0)):>7} {workers:>13}")
    by = {r["scenario"]: r for r in rows}
    h, hit = by["healthz"], by["profile cache hit"]
    keep, fresh = by["login, 64 keep-alive"], by["login, 64 new connections"]
    kill = next(r for r in rows if "kill -9" in r["scenario"])
    reload = by["healthz during reload"]
    ceiling = notes["login_ceiling_rps"]
    print()
    print("details:")
    print(f"  profile cache hit: {hit['evalsha_per_req']:.2f} EVALSHA (round trips) per request; "
          f"{hit['redis_cmds_per_req']:.2f} Redis commands per request counting those inside "
          f"the script; the script {hit['script_usec_per_call']:.1f} us per call "
          f"(commandstats), Redis {hit['redis_cpu_us_per_req']:.1f} us of CPU per request "
          f"(INFO cpu); worker {hit['worker_cpu_us_per_req']:.1f} us of CPU per request "
          f"against {h['worker_cpu_us_per_req']:.1f} for /healthz")
    print(f"  login: one at a time p50 {notes['login_single_p50_ms']:.1f} ms -> ceiling "
          f"{cores} cores / that = {ceiling:.0f}/s; measured {keep['ok_rps']:.0f}/s (200s) on 64 "
          f"keep-alive connections, {fresh['ok_rps']:.0f}/s on 64 new-connection clients; "
          f"/healthz beside them p99 {fmt(keep.get('healthz_beside_p99_ms'))} / "
          f"{fmt(fresh.get('healthz_beside_p99_ms'))} ms")
    print(f"  RSS, supervisor + 2 workers: {mib(notes['rss_idle'])} MiB idle, "
          f"{mib(notes['rss_after_login'])} MiB right after the login runs, "
          f"{mib(notes['rss_idle_after_login'])} MiB once idle again")
    print(f"  reload under load: {reload['errors']} failed requests, took {reload['reload_seconds']:.2f} s")
    print(f"  kill -9 under load: replacement ready after p50 {kill['replacement_ms_p50']:.1f} ms, "
          f"max {kill['replacement_ms_max']:.1f} ms; {kill['errors']} failed requests")
    m = by["profile, 100 ms TTL, 20 ms origin"]
    print(f"  100 ms TTL in front of a 20 ms origin: {m['requests']} requests made "
          f"{m['origin_calls']} origin calls (single flight)")
    for mode in ("shared", "reuseport"):
        r = by[f"healthz, {mode} listener"]
        print(f"  {mode} listener: {r['rps']:.0f} req/s, spread (least/most busy worker) "
              f"{r['spread_min_over_max']:.2f}")
    rp, rh = by.get("profile cache hit, reuseport"), by["healthz, reuseport listener"]
    bare = by["bare hyper worker (reference)"]
    print(f"  bare hyper workers: {bare['rps']:.0f} req/s, {fmt(bare['worker_cpu_us_per_req'], 1)} us "
          f"of worker CPU per request; forkd's /healthz (reuseport) {rh['rps']:.0f} req/s = "
          f"{rh['rps'] / max(bare['rps'], 1):.2f} x, {fmt(rh['worker_cpu_us_per_req'], 1)} us")
    if rp:
        print(f"  reuseport: cache hit {rp['rps']:.0f} req/s = {rp['rps'] / max(rh['rps'], 1):.2f} x "
              f"its /healthz, p99 {fmt(rp.get('p99_ms'))} ms, requests per worker "
              f"{'/'.join(str(n) for n in rp['requests_per_worker'])}")
    for fmt_ in ("json", "combined"):
        r = by[f"healthz, access log {fmt_} to a file"]
        print(f"  access log {fmt_}: {r['rps']:.0f} req/s = {r['rps'] / max(h['rps'], 1):.2f} x "
              f"/healthz without it; {r['access_lines']} lines written for "
              f"{r['requests']} requests")
    redis_us = max(hit["script_usec_per_call"], hit["redis_cpu_us_per_req"])
    beside = [keep.get("healthz_beside_p99_ms") or 1e9, fresh.get("healthz_beside_p99_ms") or 1e9]
    targets = [
        ("cache hit >= 0.6 x healthz req/s", hit["rps"] >= 0.6 * h["rps"],
         f"{hit['rps'] / max(h['rps'], 1):.2f} x"),
        ("cache hit p99 <= 2 ms at 64 connections", (hit["p99_ms"] or 1e9) <= 2.0,
         f"{hit['p99_ms']} ms"),
        # wrk does not count requests still in flight when it stops: allow 1 %.
        ("<= 1 Redis round trip per cache hit", hit["evalsha_per_req"] <= 1.01,
         f"{hit['evalsha_per_req']:.2f}"),
        ("Redis CPU <= 4 us per cache hit (script and INFO cpu)", redis_us <= 4.0,
         f"{hit['script_usec_per_call']:.1f} / {hit['redis_cpu_us_per_req']:.1f} us"),
        ("login, 64 keep-alive >= 90 % of the argon2 ceiling", keep["ok_rps"] >= 0.9 * ceiling,
         f"{keep['ok_rps'] / max(ceiling, 1) * 100:.0f} %"),
        ("login, 64 new connections >= 90 % of the ceiling", fresh["ok_rps"] >= 0.9 * ceiling,
         f"{fresh['ok_rps'] / max(ceiling, 1) * 100:.0f} %"),
        ("/healthz p99 <= 5 ms beside the login load", max(beside) <= 5.0,
         f"{fmt(beside[0])} / {fmt(beside[1])} ms"),
        ("supervisor + 2 workers <= 24 MiB RSS idle", notes["rss_idle"] <= 24 * 1048576,
         f"{mib(notes['rss_idle'])} MiB (after the login runs: "
         f"{mib(notes['rss_after_login'])} MiB, idle again "
         f"{mib(notes['rss_idle_after_login'])} MiB)"),
        ("kill -9: replacement within 50 ms (p50)", kill["replacement_ms_p50"] <= 50,
         f"{kill['replacement_ms_p50']:.1f} ms"),
        ("zero failed requests across a reload", reload["errors"] == 0 and reload["reload_ok"],
         f"{reload['errors']}"),
    ] + [
        (f"access log {fmt_} costs <= 10 % of /healthz req/s",
         by[f"healthz, access log {fmt_} to a file"]["rps"] >= 0.9 * h["rps"],
         f"{by[f'healthz, access log {fmt_} to a file']['rps'] / max(h['rps'], 1):.2f} x")
        for fmt_ in ("json", "combined")
    ]
    direct, via = by["upstream direct (nginx, 1 worker)"], by["nginx proxy_pass, keep-alive upstream"]
    anon, authed = by["forkd proxy, anonymous"], by["forkd proxy, session auth and a policy"]
    kept = by["forkd proxy, cached authenticated GET"]
    sess, rev = by["forkd proxy, session only"], by["revocation on another instance, under load"]
    lhit, lpol = by["profile cache hit, leased limit"], by["forkd proxy, session and a leased policy"]
    print(f"  proxying one trivial upstream ({direct['rps']:.0f} req/s direct): nginx proxy_pass "
          f"{via['rps']:.0f}, forkd anonymous {anon['rps']:.0f}, forkd with a session check and a policy "
          f"{authed['rps']:.0f} req/s ({authed['evalsha_per_req']:.2f} Redis round trips per request); "
          f"a cached authenticated GET {kept['rps']:.0f} req/s ({kept['evalsha_per_req']:.2f} round trips); "
          f"a session alone {sess['rps']:.0f} req/s ({sess['redis_cmds_per_req']:.2f} Redis commands per request)")
    print(f"  revocation: a logout on one instance reached the other, under load, after p50 "
          f"{rev['p50_ms']:.2f} ms, p99 {rev['p99_ms']:.2f} ms, max {rev['revocation_ms'][-1]:.2f} ms")
    targets += [
        at_least("forkd anonymous proxying >= nginx proxy_pass", anon, via),
        at_least("forkd proxying with session auth >= 0.8 x anonymous", authed, anon, 0.8),
        at_least("cached authenticated GET >= 0.5 x forkd's /healthz", kept, h, 0.5),
        at_least("cached /profile (exact limit) >= 0.5 x /healthz", hit, h, 0.5),
        ("Redis CPU <= 5 us per cached /profile", hit["redis_cpu_us_per_req"] <= 5.0,
         f"{hit['redis_cpu_us_per_req']:.1f} us"),
        at_least("proxy, session only >= 0.9 x anonymous", sess, anon, 0.9),
        at_least("proxy, session and an exact policy >= 0.65 x anonymous", authed, anon, 0.65),
        at_least("cached authenticated GET, no policy >= 0.8 x /healthz", kept, h, 0.8),
        at_least("cached /profile, leased limit (K = 16) >= 0.8 x /healthz", lhit, h, 0.8),
        ("Redis CPU <= 1 us per cached /profile with a leased limit",
         lhit["redis_cpu_us_per_req"] <= 1.0, f"{lhit['redis_cpu_us_per_req']:.2f} us"),
        at_least("proxy, session and a leased policy >= 0.85 x anonymous", lpol, anon, 0.85),
        ("revocation on another instance under load: p99 <= 10 ms", rev["p99_ms"] <= 10,
         f"p50 {rev['p50_ms']:.1f} ms, p99 {rev['p99_ms']:.1f} ms ({len(rev['revocation_ms'])} logouts)"),
        at_least("/healthz (reuseport) within 10 % of bare hyper workers",
                 by["healthz, reuseport listener"], by["bare hyper worker (reference)"], 0.9),
    ]
    bench_tls.report(sys.modules[__name__], by, targets)
    print()
    print("targets:")
    for name, met, value in targets:
        print(f"  {'met   ' if met else 'MISSED'} {name}: {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cores": cores, "quick": args.quick, "rows": rows, "notes": notes,
                       "targets": [{"target": n, "met": m, "value": v} for n, m, v in targets]},
                      out, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
