//! Beyond one host: two forkd instances ("hosts") on one Redis Cluster,
//! a primary failover under load, and a Sentinel-managed primary failing
//! over. Every Redis process runs on loopback, started and stopped here.

mod common;

use std::collections::HashMap;
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
    fn start() -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        // Five distinct ports: all of them held until all are picked.
        let ports = free_ports(5);
        let (primary, replica) = (ports[0], ports[1]);
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
                    "port {port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds main 1000\nsentinel failover-timeout main 5000\n\
                     sentinel parallel-syncs main 1\n"
                ),
            )
            .unwrap();
            procs.push(spawn(vec![conf.display().to_string(), "--sentinel".into()]));
        }
        let s = Sentinel {
            _dir: dir,
            procs,
            primary,
            sentinels,
        };
        poll(PATIENCE, || {
            let info = cli(s.primary, &["INFO", "replication"]);
            info.contains("connected_slaves:1").then_some(())
        })
        .expect("the replica is attached");
        // Each sentinel must know the primary, its replica and the two
        // other sentinels (found through the primary's hello channel every
        // 2 s): without them no quorum, and no failover, is ever reached.
        let field = |text: &str, name: &str| -> Option<u32> {
            let lines: Vec<&str> = text.lines().collect();
            let i = lines.iter().position(|l| *l == name)?;
            lines.get(i + 1)?.trim().parse().ok()
        };
        for &sp in &s.sentinels {
            poll(Duration::from_secs(60), || {
                let m = cli(sp, &["SENTINEL", "master", "main"]);
                (field(&m, "num-other-sentinels")? >= 2 && field(&m, "num-slaves")? >= 1)
                    .then_some(())
            })
            .expect("the sentinels know the primary, the replica and each other");
        }
        s
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
    let mut f = Forkd::configure("workers = 2\n");
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
    assert!(!f.log_text().contains(password));
}
