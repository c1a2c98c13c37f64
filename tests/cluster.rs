//! Beyond one host: two forkd instances ("hosts") on one Redis Cluster,
//! a primary failover under load, and a Sentinel-managed primary failing
//! over. Every Redis process runs on loopback, started and stopped here.

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PW: &str = "cluster-secret";

#[test]
fn two_instances_on_one_cluster_share_sessions_and_one_rate_limit() {
    let cluster = RedisCluster::start();
    // 10 an hour: no refill while the test runs.
    let config = "workers = 2\n[rate_limit.profile]\nlimit = 10\nwindow = 3600\n";
    let a = Forkd::start_with_redis(&cluster, config);
    let b = Forkd::start_with_redis(&cluster, config);
    a.add_user("sam", PW);
    a.add_user("sid", PW);

    let t = token(a.port, "sam", PW);
    assert_eq!(
        profile(b.port, &t).unwrap().status,
        200,
        "B accepts A's login"
    );
    let out = logout(a.port, &t).unwrap();
    assert_eq!(out.status, 204);
    assert_eq!(
        profile(b.port, &t).unwrap().status,
        401,
        "B refuses what A logged out"
    );

    // One limit of 10 across both instances and their 4 workers.
    let t = token(b.port, "sid", PW);
    let (pa, pb) = (a.port, b.port);
    let results = concurrently(40, move |i| profile(if i % 2 == 0 { pa } else { pb }, &t));
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for r in results {
        *counts.entry(r.expect("answered").status).or_default() += 1;
    }
    assert_eq!(counts.get(&200), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&30), "{counts:?}");

    // `forkd status` names the mode and the nodes.
    let out = a.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("redis: cluster"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", cluster.ports[0])) || text.contains("127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn a_primary_failover_keeps_the_session_and_the_limit() {
    let mut cluster = RedisCluster::start();
    // 10 an hour: no refill while the failover runs.
    let f = Forkd::start_with_redis(
        &cluster,
        "workers = 2\nshutdown_timeout = 5\n[rate_limit.profile]\nlimit = 10\nwindow = 3600\n",
    );
    let workers = f.wait_ready();
    f.add_user("tara", PW);
    let t = token(f.port, "tara", PW);
    for _ in 0..5 {
        assert_eq!(profile(f.port, &t).unwrap().status, 200);
    }
    let uid = &t[..12];
    let primary = cluster.primary_of(&format!("{{{uid}}}"));
    cluster.wait_replicated(primary);

    cluster.kill(primary);
    let killed = Instant::now();
    let mut counts: HashMap<u16, usize> = HashMap::new();
    let mut recovered = None;
    // Until the limit bites again (or a generous deadline).
    while killed.elapsed() < Duration::from_secs(60) {
        let r = profile(f.port, &t).expect("answered");
        *counts.entry(r.status).or_default() += 1;
        match r.status {
            200 => {
                recovered.get_or_insert(killed.elapsed());
            }
            429 => break,
            503 => assert!(r.header("retry-after").is_some()),
            s => panic!("unexpected status {s} during the failover: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "failover: statuses {counts:?}; service back after {:?}",
        recovered.unwrap_or_default()
    );
    // The session survived (200s after the failover), the limit held
    // (exactly the 5 requests left of 10), and errors were 503s only.
    assert_eq!(counts.get(&200), Some(&5), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&1), "{counts:?}");
    assert!(
        counts.keys().all(|s| [200, 429, 503].contains(s)),
        "{counts:?}"
    );
    assert_eq!(f.wait_ready(), workers, "no worker restarted");
}

struct Sentinel {
    _dir: tempfile::TempDir,
    procs: Vec<Child>,
    primary: u16,
    sentinels: Vec<u16>,
}

impl Sentinel {
    /// A primary, its replica and three sentinels that know each other.
    /// Each attempt starts on fresh ports; one that does not come together
    /// (a port another program took between the pick and the bind, a
    /// sentinel that never heard the others) is shown with its logs and
    /// made again, at most three times.
    fn start() -> Sentinel {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Sentinel::try_start() {
                Ok(s) => return s,
                Err(why) => {
                    eprintln!("a sentinel setup did not come together:\n{why}");
                    failures.push(why);
                }
            }
        }
        panic!(
            "the sentinels never knew the primary, the replica and each other:\n{}",
            failures.join("\n---\n")
        );
    }

    fn try_start() -> Result<Sentinel, String> {
        let dir = tempfile::tempdir().unwrap();
        // Five distinct ports: all of them held until all are picked.
        let ports = free_ports(5);
        let (primary, replica) = (ports[0], ports[1]);
        let log = |name: &str| dir.path().join(format!("{name}.log"));
        let spawn = |args: Vec<String>| {
            Command::new("redis-server")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs")
        };
        let server = |port: u16, extra: &[&str]| {
            let mut a: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.push("--dir".into());
            a.push(dir.path().display().to_string());
            a.push("--dbfilename".into());
            a.push(format!("dump-{port}.rdb"));
            a.push("--logfile".into());
            a.push(log(&format!("redis-{port}")).display().to_string());
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let mut procs = vec![spawn(server(primary, &[]))];
        let p = primary.to_string();
        procs.push(spawn(server(replica, &["--replicaof", "127.0.0.1", &p])));
        let sentinels: Vec<u16> = ports[2..].to_vec();
        for port in &sentinels {
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nlogfile {}\n\
                     sentinel monitor main 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds main 1000\nsentinel failover-timeout main 5000\n\
                     sentinel parallel-syncs main 1\n",
                    log(&format!("sentinel-{port}")).display()
                ),
            )
            .unwrap();
            procs.push(spawn(vec![conf.display().to_string(), "--sentinel".into()]));
        }
        let mut s = Sentinel {
            _dir: dir,
            procs,
            primary,
            sentinels,
        };
        // What went wrong, for the panic: who exited, what each sentinel
        // knows, and the tail of every log.
        let report = |s: &mut Sentinel, what: &str| -> String {
            let mut out = format!("{what}\n");
            for p in &mut s.procs {
                if let Ok(Some(status)) = p.try_wait() {
                    out.push_str(&format!("process {} exited: {status}\n", p.id()));
                }
            }
            for &sp in &s.sentinels {
                let m = cli(sp, &["SENTINEL", "master", "main"]);
                out.push_str(&format!(
                    "sentinel {sp}: {}\n",
                    m.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
            let mut logs: Vec<_> = std::fs::read_dir(s._dir.path())
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
            logs.sort();
            for path in logs {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                out.push_str(&format!("== {}\n{tail}\n", path.display()));
            }
            out
        };
        if poll(PATIENCE, || {
            let info = cli(s.primary, &["INFO", "replication"]);
            info.contains("connected_slaves:1").then_some(())
        })
        .is_none()
        {
            return Err(report(&mut s, "the replica never attached"));
        }
        // Each sentinel must know the primary, its replica and the two
        // other sentinels (found through the primary's hello channel every
        // 2 s): without them no quorum, and no failover, is ever reached.
        let field = |text: &str, name: &str| -> Option<u32> {
            let lines: Vec<&str> = text.lines().collect();
            let i = lines.iter().position(|l| *l == name)?;
            lines.get(i + 1)?.trim().parse().ok()
        };
        for sp in s.sentinels.clone() {
            let known = poll(Duration::from_secs(45), || {
                let m = cli(sp, &["SENTINEL", "master", "main"]);
                (field(&m, "num-other-sentinels")? >= 2 && field(&m, "num-slaves")? >= 1)
                    .then_some(())
            });
            if known.is_none() {
                return Err(report(
                    &mut s,
                    &format!("sentinel {sp} never knew them all"),
                ));
            }
        }
        Ok(s)
    }

    fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName=main&node=127.0.0.1:{}&node=127.0.0.1:{}",
            self.sentinels[0], self.sentinels[1], self.sentinels[2]
        )
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Waits until `forkd status` shows every worker's near cache tracking.
fn near_tracking(f: &Forkd) {
    poll(PATIENCE, || {
        let out = f.cli(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("redis: ")).collect();
        (!lines.is_empty()
            && lines
                .iter()
                .all(|l| l.contains("; near cache: ") && l.contains(" held, ")))
        .then_some(())
    })
    .expect("every worker's near cache is tracking");
}

/// How many of forkd's near-cache connections the node on `port` has.
fn near_connections(cluster: &RedisCluster, port: u16) -> usize {
    cluster
        .cli_at(port, &["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(" name=forkd-near-"))
        .count()
}

/// GETs `path` on `port` until one is a cache hit that sent no primary
/// any command (MONITOR on each); panics after the test's patience.
fn until_warm(port: u16, monitors: &mut [Monitor], path: &str, auth: &str) {
    let mut n = 0;
    poll(PATIENCE, || {
        n += 1;
        let r = request(port, "GET", path, &[("Authorization", auth)], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let sent: Vec<String> = monitors
            .iter_mut()
            .flat_map(|m| m.sent_before_marker(&format!("warm-{n}")))
            .collect();
        (r.header("x-cache") == Some("hit") && sent.is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("{path} never answered from the near cache"));
}

/// GETs `path` on `port` until it answers 401; panics after the test's
/// patience (less than the near cache's 60 s `near_cache_max_age`, so an
/// invalidation that never came fails the test).
fn until_refused(port: u16, path: &str, auth: &str) {
    poll(PATIENCE, || {
        let r = request(port, "GET", path, &[("Authorization", auth)], b"").unwrap();
        (r.status == 401).then_some(())
    })
    .expect("the session ended on the other instance too");
}

/// The near cache on Redis Cluster: each worker has a listener and a
/// reader on every primary; a warm hit sends no node anything; a logout
/// on one instance reaches the other's memory; after the failover of the
/// primary that owns the user's slot, the pairs are made again on the new
/// primaries, and a logout there reaches it as well.
#[test]
fn the_near_cache_tracks_every_primary_and_follows_a_failover() {
    let mut cluster = RedisCluster::start();
    let api = Upstream::tcp();
    let config = format!(
        "workers = 1\nshutdown_timeout = 5\n\
         [[route]]\nprefix = \"/u\"\nupstream = \"{}\"\nstrip_prefix = true\ncache = true\n",
        api.url()
    );
    let a = Forkd::start_with_redis(&cluster, &config);
    let b = Forkd::start_with_redis(&cluster, &config);
    a.add_user("nell", PW);
    let path = "/u/me?cc=private%2Cmax-age%3D60";
    let pairs_everywhere = |cluster: &RedisCluster| {
        // Nodes learn of a failover by gossip, each in its own time.
        let primaries = poll(Duration::from_secs(60), || {
            Some(cluster.primaries()).filter(|p| p.len() == 3)
        })
        .expect("three primaries");
        for &p in &primaries {
            // Two instances, one worker each, a listener and a reader.
            poll(PATIENCE, || {
                (near_connections(cluster, p) == 4).then_some(())
            })
            .unwrap_or_else(|| panic!("no near-cache pairs on the primary on {p}"));
        }
        primaries
    };
    let primaries = pairs_everywhere(&cluster);

    let t = format!("Bearer {}", token(a.port, "nell", PW));
    let mut monitors: Vec<Monitor> = primaries.iter().map(|&p| Monitor::at(p)).collect();
    until_warm(b.port, &mut monitors, path, &t);
    let r = request(a.port, "POST", "/logout", &[("Authorization", &t)], b"").unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    until_refused(b.port, path, &t);
    drop(monitors);

    // The primary that owns the user's slot hands over to its replica
    // (CLUSTER FAILOVER: no connection is lost, and the old primary, now a
    // replica, is told nothing of the writes it copies) while B holds a
    // new session in memory.
    let raw = token(a.port, "nell", PW);
    let t = format!("Bearer {raw}");
    let owner = cluster.primary_of(&format!("{{{}}}", &raw[..12]));
    let replica = cluster.replica_of(owner);
    let mut monitors: Vec<Monitor> = primaries.iter().map(|&p| Monitor::at(p)).collect();
    until_warm(b.port, &mut monitors, path, &t);
    drop(monitors);
    cluster.wait_replicated(owner);
    assert_eq!(
        cluster.cli_at(replica, &["CLUSTER", "FAILOVER"]).trim(),
        "OK"
    );
    poll(Duration::from_secs(60), || {
        let now = cluster.primaries();
        (now.len() == 3 && now.contains(&replica) && !now.contains(&owner)).then_some(())
    })
    .expect("the replica took over");
    // B made its pairs on the new primary (a rebuild empties the near
    // cache), holds the session again, and hears the logout there.
    let primaries = pairs_everywhere(&cluster);
    let mut monitors: Vec<Monitor> = primaries.iter().map(|&p| Monitor::at(p)).collect();
    until_warm(b.port, &mut monitors, path, &t);
    drop(monitors);
    let r = request(a.port, "POST", "/logout", &[("Authorization", &t)], b"").unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    until_refused(b.port, path, &t);

    // The primary that owns the user's slot is killed while B holds a
    // new session in memory.
    let raw = token(a.port, "nell", PW);
    let t = format!("Bearer {raw}");
    let owner = cluster.primary_of(&format!("{{{}}}", &raw[..12]));
    let mut monitors: Vec<Monitor> = primaries.iter().map(|&p| Monitor::at(p)).collect();
    until_warm(b.port, &mut monitors, path, &t);
    drop(monitors);
    cluster.wait_replicated(owner);
    cluster.kill(owner);
    poll(Duration::from_secs(60), || {
        (cluster.primaries().len() == 3 && !cluster.primaries().contains(&owner)).then_some(())
    })
    .expect("a replica took over");
    let primaries = pairs_everywhere(&cluster);
    let mut monitors: Vec<Monitor> = primaries.iter().map(|&p| Monitor::at(p)).collect();
    until_warm(b.port, &mut monitors, path, &t);
    let r = request(a.port, "POST", "/logout", &[("Authorization", &t)], b"").unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    until_refused(b.port, path, &t);
    // `forkd status` shows the near cache on the cluster.
    let out = b.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("redis: cluster (tcp)") && l.contains("; near cache: ")),
        "{text}"
    );
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw"])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_sentinel_failover_keeps_the_login() {
    let mut s = Sentinel::start();
    let mut f =
        Forkd::configure("workers = 2\n[rate_limit.profile]\nlimit = 100000\nwindow = 60\n");
    f.env.push(("FORKD_REDIS_URL".into(), s.url()));
    f.spawn(&[]);
    f.wait_ready();
    f.add_user("uma", PW);
    let t = token(f.port, "uma", PW);
    assert_eq!(profile(f.port, &t).unwrap().status, 200);
    let out = f.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("redis: sentinel"));
    // Everything written so far is on the replica.
    poll(PATIENCE, || {
        replica_caught_up(&cli(s.primary, &["INFO", "replication"])).then_some(())
    })
    .expect("replicated");

    let _ = s.procs[0].kill();
    let _ = s.procs[0].wait();
    let killed = Instant::now();
    let back = poll(Duration::from_secs(60), || {
        let r = profile(f.port, &t).ok()?;
        match r.status {
            200 => Some(killed.elapsed()),
            503 => None,
            other => panic!("unexpected status {other} during the failover: {r:?}"),
        }
    })
    .expect("the same login works after the failover");
    eprintln!("sentinel failover: the login worked again after {back:?}");
    // The near cache found the new primary through the sentinels: both
    // workers track there, and a logout reaches both.
    near_tracking(&f);
    let auth = format!("Bearer {t}");
    let warm = |n: usize| {
        let mut run = 0;
        poll(PATIENCE, || {
            let r = request(f.port, "GET", "/profile", &[("Authorization", &auth)], b"").ok()?;
            run = if r.status == n as u16 { run + 1 } else { 0 };
            (run >= 20).then_some(())
        })
    };
    warm(200).expect("the session served again");
    let r = request(f.port, "POST", "/logout", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    warm(401).expect("both workers refuse the ended session");
    // Each sentinel learns of the new primary in its own time.
    for &sentinel in &s.sentinels {
        poll(PATIENCE, || {
            let addr = cli(sentinel, &["SENTINEL", "get-master-addr-by-name", "main"]);
            (!addr.contains(&s.primary.to_string())).then_some(())
        })
        .expect("the sentinels name a new primary");
    }
}

#[test]
fn tls_and_a_password_from_a_file_work_and_the_password_is_never_shown() {
    // A private CA and a server certificate for 127.0.0.1, made here.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let port = free_port();
    let _redis = KillOnDrop(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.crt",
            ])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--requirepass",
                "tls-pass-42",
                "--logfile",
                "",
            ])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs"),
    );
    std::fs::write(d.join("password"), "tls-pass-42\n").unwrap();

    let mut f = Forkd::configure(&format!(
        "workers = 1\n[redis]\nurl = \"rediss://127.0.0.1:{port}\"\npassword_file = \"{}\"\n",
        d.join("password").display()
    ));
    // The private CA is trusted through SSL_CERT_FILE.
    f.env.push((
        "SSL_CERT_FILE".into(),
        d.join("ca.crt").display().to_string(),
    ));
    f.spawn(&[]);
    f.wait_ready();
    poll(PATIENCE, || {
        (get(f.port, "/readyz").ok()?.status == 200).then_some(())
    })
    .expect("connected over TLS with the password");
    f.add_user("val", PW);
    let t = token(f.port, "val", PW);
    assert_eq!(profile(f.port, &t).unwrap().status, 200);
    let status = String::from_utf8_lossy(&f.cli(&["status"]).stdout).into_owned();
    assert!(status.contains("redis: standalone (tls)"), "{status}");
    let config = String::from_utf8_lossy(&f.cli(&["check-config"]).stdout).into_owned();
    for text in [&config, &status, &f.log_text()] {
        assert!(!text.contains("tls-pass-42"), "the password leaked: {text}");
    }
}

/// Ends a child process however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private CA and a certificate for 127.0.0.1 in `d`: ca.crt,
/// server.crt, server.key.
fn make_certs(d: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=forkd test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn a_tls_cluster_with_a_password_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let password = "cluster-pass-7";
    let ports = cluster_ports(6);
    let mut nodes = Vec::new();
    for &p in &ports {
        let nd = d.join(p.to_string());
        std::fs::create_dir_all(&nd).unwrap();
        let child = redis_server(p, &nd)
            .args(["--port", "0", "--tls-port", &p.to_string()])
            .arg("--tls-cert-file")
            .arg(d.join("server.crt"))
            .arg("--tls-key-file")
            .arg(d.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(d.join("ca.crt"))
            .args([
                "--tls-auth-clients",
                "no",
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
            ])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args([
                "--cluster-config-file",
                "nodes.conf",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--requirepass", password, "--masterauth", password])
            .spawn()
            .expect("redis-server runs");
        nodes.push(KillOnDrop(child));
    }
    let ca = d.join("ca.crt").display().to_string();
    let tls = [
        "--tls",
        "--cacert",
        ca.as_str(),
        "-a",
        password,
        "--no-auth-warning",
    ];
    let tls_cli = |port: u16, args: &[&str]| -> String {
        let p = port.to_string();
        let options: Vec<&str> = tls.iter().copied().chain(["-p", &p, "--raw"]).collect();
        redis_cli_lines(&options, args).join("\n")
    };
    for &p in &ports {
        poll(PATIENCE, || {
            (tls_cli(p, &["PING"]).trim() == "PONG").then_some(())
        })
        .expect("node up");
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(tls)
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    poll(Duration::from_secs(60), || {
        ports
            .iter()
            .all(|&p| tls_cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            .then_some(())
    })
    .expect("cluster ok");
    std::fs::write(d.join("password"), format!("{password}\n")).unwrap();

    let mut url = format!("rediss-cluster://127.0.0.1:{}", ports[0]);
    for (i, p) in ports[1..].iter().enumerate() {
        url.push_str(&format!(
            "{}node=127.0.0.1:{p}",
            if i == 0 { '?' } else { '&' }
        ));
    }
    let mut f = Forkd::configure(&format!(
        "workers = 2\n[redis]\nurl = \"{url}\"\npassword_file = \"{}\"\n",
        d.join("password").display()
    ));
    f.env.push(("SSL_CERT_FILE".into(), ca.clone()));
    f.spawn(&[]);
    f.wait_ready();
    f.add_user("wes", PW);
    let t = token(f.port, "wes", PW);
    assert_eq!(profile(f.port, &t).unwrap().status, 200);
    let status = String::from_utf8_lossy(&f.cli(&["status"]).stdout).into_owned();
    assert!(status.contains("redis: cluster (tls)"), "{status}");
    // The near cache's pairs on every primary made it over TLS too.
    near_tracking(&f);
    assert!(!f.log_text().contains(password));
}

/// `bin/cluster --binary BIN`, run as the README runs it, in a process
/// group of its own with its output in files; SIGTERM to the group (its
/// trap stops the nodes and hosts) when dropped.
struct BinCluster {
    child: Child,
    dir: tempfile::TempDir,
}

impl BinCluster {
    fn start(env: &[(&str, &str)]) -> BinCluster {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("stdout")).unwrap();
        let err = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut c = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bin/cluster"));
        c.args(["--binary", BIN])
            .env("TMPDIR", dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        for (k, v) in env {
            c.env(k, v);
        }
        BinCluster {
            child: c.spawn().expect("bin/cluster runs"),
            dir,
        }
    }

    fn output(&self) -> (String, String) {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        (read("stdout"), read("stderr"))
    }

    /// The banner's text once bin/cluster printed it (all is up).
    fn wait_banner(&mut self) -> String {
        poll(Duration::from_secs(180), || {
            if let Some(status) = self.child.try_wait().unwrap() {
                let (out, err) = self.output();
                panic!("bin/cluster exited ({status}) before it was up:\n{out}\n{err}");
            }
            let (out, _) = self.output();
            out.contains("Ctrl-C stops everything.").then_some(out)
        })
        .unwrap_or_else(|| panic!("bin/cluster was not up in 180 s: {:?}", self.output()))
    }

    /// Stops it as Ctrl-C does; its exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
        if let Some(s) = poll(Duration::from_secs(60), || self.child.try_wait().unwrap()) {
            return s;
        }
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        self.child.wait().unwrap()
    }
}

impl Drop for BinCluster {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// Established loopback connections that hold ephemeral ports (as a busy
/// machine's clients do, thousands of them during a test run) until
/// dropped; closed with a reset, so that they leave no TIME-WAIT behind.
/// Linux gives connect() even ports first and bind(0) odd ones, so the
/// free ports other tests take (`free_port`, `cluster_ports`) are left
/// alone while the ports are held.
struct BusyPorts {
    _held: Vec<TcpStream>,
}

impl BusyPorts {
    fn hold(n: usize) -> BusyPorts {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let n = n.min((soft.saturating_sub(1024) / 2) as usize);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            for end in [&c, &s] {
                socket2::SockRef::from(end)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            held.push(c);
            held.push(s);
        }
        eprintln!("holding {n} ephemeral ports");
        BusyPorts { _held: held }
    }
}

/// The README's `FORKD_PORTS="A B" bin/cluster` comes up, and comes up
/// every time: each Redis node binds its port and its cluster bus port
/// (port + 10000), and a port another program's connection holds (a
/// client's ephemeral port, which a connect probe does not see) makes the
/// node exit at once. Here thousands of ephemeral ports are held, as on a
/// machine running tests, while bin/cluster starts.
#[test]
fn bin_cluster_comes_up_with_forkd_ports_while_ephemeral_ports_are_busy() {
    let ports = free_ports(2);
    let (a, b) = (ports[0], ports[1]);
    let busy = BusyPorts::hold(8000);
    let mut run = BinCluster::start(&[("FORKD_PORTS", &format!("{a} {b}"))]);
    let banner = run.wait_banner();
    drop(busy);
    assert!(
        banner.contains(&format!("forkd host A: http://127.0.0.1:{a}")),
        "{banner}"
    );
    assert!(
        banner.contains(&format!("forkd host B: http://127.0.0.1:{b}")),
        "{banner}"
    );
    let (_, err) = run.output();
    assert!(!err.contains("FORKD_PORTS"), "{err}");

    // The banner's own recipe: a user added through host A's config, a
    // login on A, its session read on B.
    let config = banner
        .split("(config ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("the banner names host A's config");
    let out = Command::new(BIN)
        .args([
            "--config",
            config,
            "user",
            "add",
            "alice",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"pw\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = token(a, "alice", "pw");
    assert_eq!(profile(b, &t).unwrap().status, 200, "B reads A's session");

    run.stop();
    assert!(
        port_free(a) && port_free(b),
        "the hosts stopped with bin/cluster"
    );
}

/// A node that cannot start (here the first redis-server exits at once,
/// as one whose bus port was taken does) is reported with its log and
/// replaced on other ports, instead of `--cluster create` failing with
/// "Connection refused" after a silent wait.
#[test]
fn bin_cluster_reports_a_node_that_could_not_start_and_tries_other_ports() {
    let real = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .find(|f| f.is_file())
        })
        .expect("redis-server is installed");
    let fake = tempfile::tempdir().unwrap();
    let script = format!(
        "#!/bin/sh\n\
         # The first start fails as a node whose bus port is taken does.\n\
         if mkdir \"$0.failed\" 2>/dev/null; then\n\
         \x20   while [ $# -gt 0 ]; do\n\
         \x20       [ \"$1\" = --logfile ] && echo '1:M # Failed listening on port 1 (cluster), aborting.' >\"$2\"\n\
         \x20       shift\n\
         \x20   done\n\
         \x20   exit 1\n\
         fi\n\
         exec {} \"$@\"\n",
        real.display()
    );
    install_executable(&fake.path().join("redis-server"), script.as_bytes(), 0o755);
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ports = free_ports(2);
    let mut run = BinCluster::start(&[
        ("FORKD_PORTS", &format!("{} {}", ports[0], ports[1])),
        ("PATH", &path),
    ]);
    run.wait_banner();
    let (_, err) = run.output();
    assert!(err.contains("did not start"), "{err}");
    assert!(
        err.contains("Failed listening on port 1 (cluster)"),
        "{err}"
    );
    assert!(err.contains("trying 127.0.0.1:"), "{err}");
    poll(PATIENCE, || {
        (get(ports[0], "/readyz").ok()?.status == 200).then_some(())
    })
    .expect("host A is ready on the cluster");
}
