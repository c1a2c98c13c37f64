"""The HTTPS and HTTP/2 rows of bin/bench (imported by bench.py).

Same machine, same run, one certificate (ECDSA P-256, made here with
openssl) for forkd and nginx:

- TLS handshakes per second: wrk with `Connection: close`, so every request
  is a new connection and a new handshake, against forkd's /healthz and
  nginx's `return 200` (2 workers each: every core busy);
- keep-alive HTTPS /healthz and cached /profile, against the plain rows;
- h2load against /healthz over h2, many streams per connection.
"""
import os
import re
import shutil
import subprocess


def make_certificate(d):
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def h2load(url, seconds, clients=4, streams=10):
    out = subprocess.run(["h2load", "-D", str(seconds), "-c", str(clients), "-m", str(streams),
                          url], capture_output=True, text=True).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    row = {"rps": float(rps.group(1)) if rps else 0.0, "p50_ms": None, "p99_ms": None,
           "requests": int(done.group(2)) if done else 0,
           "errors": sum(int(x) for x in done.groups()[2:]) if done else 1}
    proto = re.search(r"Application protocol: (\S+)", out)
    row["protocol"] = proto.group(1) if proto else "?"
    return row


def run(b, tmp, redis, secs, high, token, rows, started, nginxes):
    """Adds the rows; `b` is the bench module (its Forkd, Nginx, wrk, measure)."""
    d = os.path.join(tmp, "tls-files")
    os.makedirs(d)
    cert, key = make_certificate(d)
    t = b.Forkd(tmp, "tls", redis, high + f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    started.append(t)

    def url(path):
        return f"https://127.0.0.1:{t.port}{path}"

    rows.append(b.measure("TLS healthz, keep-alive", t, redis,
                          lambda: b.wrk(url("/healthz"), secs), secs))
    rows.append(b.measure("TLS profile cache hit, keep-alive", t, redis, lambda: b.wrk(
        url("/profile"), secs, headers=[f"Authorization: Bearer {token}"]), secs))
    # h2load before the handshakes: right after a run of short connections
    # the workers leave new ones to the race (docs/operations.md, "Listener modes"),
    # which would then decide where h2load's 4 connections land.
    h2 = b.measure("h2load /healthz, 4 conns x 10 streams", t, redis,
                   lambda: h2load(url("/healthz"), secs), secs)
    rows.append(h2)
    rows.append(b.measure("TLS handshakes, forkd /healthz", t, redis, lambda: b.wrk(
        url("/healthz"), secs, headers=["Connection: close"]), secs))
    rows[-1]["protocol"] = protocol(t.port)
    t.stop()
    started.remove(t)
    # The same handshakes with a socket per worker: no worker wakes for a
    # connection another takes (nginx's workers share one socket with
    # EPOLLEXCLUSIVE, which tokio does not use).
    r = b.Forkd(tmp, "tls-reuseport", redis, 'listener = "reuseport"\n' + high +
                f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    started.append(r)
    rows.append(b.measure("TLS handshakes, forkd, reuseport", r, redis, lambda: b.wrk(
        f"https://127.0.0.1:{r.port}/healthz", secs, headers=["Connection: close"]), secs))
    r.stop()
    started.remove(r)

    # nginx with TLS 1.3 enabled, as Mozilla's intermediate configuration
    # and nginx's own default since 1.23.4 have it: the like-for-like peer.
    # Debian 12's nginx 1.22 speaks only up to TLS 1.2 unless told, and a
    # resumed TLS 1.2 handshake skips the key exchange that TLS 1.3 always
    # makes (X25519, the bulk of a resumed TLS 1.3 handshake on both
    # sides), so that default is measured beside it, not compared with.
    port, port12 = b.free_port(), b.free_port()
    n = b.Nginx(tmp, "nginx-tls", f"""    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok"; }}
    }}
    server {{
        listen 127.0.0.1:{port12} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok"; }}
    }}""", workers=os.cpu_count() or 1)
    nginxes.append(n)
    for p in (port, port12):
        b.wait_for(lambda: subprocess.run(
            ["curl", "-sk", "-o", "/dev/null", f"https://127.0.0.1:{p}/"]).returncode == 0)
    for p, name in ((port, "TLS handshakes, nginx return 200"),
                    (port12, "TLS handshakes, nginx, its default protocols")):
        r = b.wrk(f"https://127.0.0.1:{p}/", secs, headers=["Connection: close"])
        rows.append({"scenario": name, **r, "protocol": protocol(p)})
    n.stop()
    nginxes.remove(n)


def protocol(port):
    """The TLS version a server at `port` settles on with OpenSSL's client."""
    try:
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "?"
    m = re.search(r"Protocol version: (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else "?"


def report(b, by, targets):
    plain, tls = by["healthz"], by["TLS healthz, keep-alive"]
    hit, tls_hit = by["profile cache hit"], by["TLS profile cache hit, keep-alive"]
    hs, nginx = by["TLS handshakes, forkd /healthz"], by["TLS handshakes, nginx return 200"]
    hs_rp = by["TLS handshakes, forkd, reuseport"]
    nginx12 = by["TLS handshakes, nginx, its default protocols"]
    h2 = by["h2load /healthz, 4 conns x 10 streams"]
    print(f"  HTTPS: keep-alive /healthz {tls['rps']:.0f} req/s ({tls['rps'] / max(plain['rps'], 1):.2f} x "
          f"plain), cached /profile {tls_hit['rps']:.0f} ({tls_hit['rps'] / max(hit['rps'], 1):.2f} x "
          f"plain); handshakes (one request per connection) forkd {hs['rps']:.0f}/s "
          f"({hs_rp['rps']:.0f}/s with reuseport) over {hs['protocol']}, nginx {nginx['rps']:.0f}/s "
          f"over {nginx['protocol']} ({nginx12['rps']:.0f}/s over {nginx12['protocol']}, "
          f"its default); "
          f"h2load over {h2['protocol']}: {h2['rps']:.0f} req/s")
    name, ok, ratio = b.at_least("TLS handshakes >= nginx's, the same protocol", hs, nginx)
    same = hs["protocol"] == nginx["protocol"] != "?"
    targets += [
        (name, ok and same,
         f"{ratio} ({hs['protocol']})" if same else
         f"{ratio}, but over {hs['protocol']} against {nginx['protocol']}"),
        b.at_least("keep-alive TLS /healthz >= 0.8 x plain", tls, plain, 0.8),
        b.at_least("keep-alive TLS cached /profile >= 0.8 x plain", tls_hit, hit, 0.8),
        ("h2load over h2 without a failed request", h2["errors"] == 0 and h2["requests"] > 0,
         f"{h2['requests']} requests, {h2['errors']} failed"),
    ]


def available():
    return all(shutil.which(t) for t in ("openssl", "h2load", "curl"))
