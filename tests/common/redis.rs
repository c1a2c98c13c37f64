//! Redis for the tests: a server or a 3+3 cluster of their own on free
//! loopback ports, killed when dropped, and redis-cli.

use super::*;

/// A free port whose cluster bus port (port + 10000) is valid and free too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let p = free_port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// `n` distinct cluster node ports (none another's bus port).
pub fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let p = free_cluster_port();
        if !ports.iter().any(|&q| q == p || q.abs_diff(p) == 10_000) {
            ports.push(p);
        }
    }
    ports
}

/// A redis-server of the test's own, on a free loopback port, killed when
/// dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.spawn();
        r
    }

    /// (Re)starts the server on the same port and data directory. Every
    /// write is synced, so a SIGKILLed server comes back with its data.
    pub fn spawn(&mut self) {
        let child = redis_server(self.port, self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .spawn()
            .expect("redis-server runs (bin/test installs it)");
        self.child = Some(child);
        poll(PATIENCE, || {
            (self.cli(&["PING"]).trim() == "PONG").then_some(())
        })
        .expect("redis-server answers PING");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILLs the server and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs redis-cli against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-raw"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like `cli`, with raw output (one value a line).
    pub fn raw(&self, args: &[&str]) -> Vec<String> {
        redis_cli_lines(&["-p", &self.port.to_string(), "--raw"], args)
    }

    /// Every key (SCAN).
    pub fn keys(&self) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--scan"])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Commands processed so far (INFO stats).
    pub fn commands_processed(&self) -> u64 {
        self.raw(&["INFO", "stats"])
            .iter()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli monitor` on a test's server: what clients send, marked off
/// by `ECHO` markers. Killed when dropped.
pub struct Monitor {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    port: u16,
}

impl Monitor {
    pub fn start(redis: &RedisServer) -> Monitor {
        Monitor::at(redis.port)
    }

    /// MONITOR on the server (or cluster node) on `port`.
    pub fn at(port: u16) -> Monitor {
        let mut child = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-cli runs");
        let mut lines = BufReader::new(child.stdout.take().expect("a pipe")).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("OK"));
        Monitor { child, lines, port }
    }

    /// What requests sent before a marker: [`Monitor::all_before_marker`]
    /// but the lines of forkd's near-cache connections (named
    /// `forkd-near-*`: their fills, and the PING, CLIENT TRACKINGINFO and ROLE
    /// that check them every second, belong to no request).
    pub fn sent_before_marker(&mut self, marker: &str) -> Vec<String> {
        let sent = self.all_before_marker(marker);
        let list = redis_cli_lines(&["-p", &self.port.to_string()], &["CLIENT", "LIST"]);
        let near: Vec<String> = list
            .iter()
            .filter(|l| l.contains(" name=forkd-near-"))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("addr=")))
            .map(|a| format!(" {a}]"))
            .collect();
        sent.into_iter()
            .filter(|l| !near.iter().any(|a| l.contains(a.as_str())))
            .collect()
    }

    /// Sends a marker, then returns what clients sent before it: MONITOR
    /// shows the commands a script runs too, marked "lua", which are left
    /// out.
    pub fn all_before_marker(&mut self, marker: &str) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ECHO", marker])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success());
        let mut sent = Vec::new();
        for line in self.lines.by_ref().take(10_000) {
            let line = line.expect("monitor output");
            if line.contains(marker) {
                return sent;
            }
            if !line.contains(" lua]") {
                sent.push(line);
            }
        }
        panic!("no marker {marker} in the monitor's output: {sent:?}");
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of 3 primaries and 3 replicas on free loopback ports,
/// with a 1 s node timeout so that failovers take seconds; every node is
/// killed when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
    nodes: Vec<Child>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = cluster_ports(6);
        let mut nodes = Vec::new();
        for port in &ports {
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let child = redis_server(*port, &d)
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--save", "", "--appendonly", "no"])
                .spawn()
                .expect("redis-server runs");
            nodes.push(child);
        }
        let c = RedisCluster {
            ports,
            _dir: dir,
            nodes,
        };
        for &p in &c.ports {
            poll(PATIENCE, || {
                (c.cli_at(p, &["PING"]).trim() == "PONG").then_some(())
            })
            .expect("node answers");
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        c.wait_ok();
        c
    }

    /// Waits until every live node says the cluster is ok.
    pub fn wait_ok(&self) {
        poll(Duration::from_secs(60), || {
            self.live_ports()
                .iter()
                .all(|&p| {
                    self.cli_at(p, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                })
                .then_some(())
        })
        .expect("cluster_state:ok");
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, c)| alive(c.id() as i32))
            .map(|(p, _)| *p)
            .collect()
    }

    /// `redis-cluster://` with every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.ports[0]);
        for (i, p) in self.ports[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{p}"));
        }
        url
    }

    pub fn cli_at(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--raw"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command routed to the node that owns its key (redis-cli -c).
    pub fn raw(&self, args: &[&str]) -> Vec<String> {
        let port = self.live_ports()[0];
        redis_cli_lines(&["-c", "-p", &port.to_string(), "--raw"], args)
    }

    /// Every key on every primary.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for p in self.live_ports() {
            if !self.cli_at(p, &["ROLE"]).starts_with("master") {
                continue;
            }
            let out = Command::new("redis-cli")
                .args(["-p", &p.to_string(), "--scan"])
                .output()
                .unwrap();
            keys.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_owned),
            );
        }
        keys.sort();
        keys
    }

    /// The port of the primary that owns `key`'s slot.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = self.raw(&["CLUSTER", "KEYSLOT", key])[0]
            .trim()
            .parse()
            .unwrap();
        let nodes = self.cli_at(self.live_ports()[0], &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                    if (a..=b).contains(&slot) {
                        let port = f[1].split('@').next().unwrap().rsplit(':').next().unwrap();
                        return port.parse().unwrap();
                    }
                }
            }
        }
        panic!("no primary for slot {slot}:\n{nodes}");
    }

    /// The ports of the primaries that own slots now, as one node sees
    /// them and each says of itself.
    pub fn primaries(&self) -> Vec<u16> {
        let nodes = self.cli_at(self.live_ports()[0], &["CLUSTER", "NODES"]);
        let mut ports: Vec<u16> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() >= 9 && f[2].contains("master") && !f[2].contains("fail"))
            .filter_map(|f| f[1].split('@').next()?.rsplit(':').next()?.parse().ok())
            // One node's view may lag a failover: each must say so itself.
            .filter(|&p| self.cli_at(p, &["ROLE"]).lines().next() == Some("master"))
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the replica of the primary on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let nodes = self.cli_at(self.live_ports()[0], &["CLUSTER", "NODES"]);
        let fields: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let port_of = |f: &[&str]| -> Option<u16> {
            f.get(1)?
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        };
        let id = fields
            .iter()
            .find(|f| port_of(f) == Some(port))
            .map(|f| f[0])
            .unwrap_or_else(|| panic!("no node on {port}:\n{nodes}"));
        fields
            .iter()
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
            .and_then(|f| port_of(f))
            .unwrap_or_else(|| panic!("no replica of {port}:\n{nodes}"))
    }

    /// Waits until the primary on `port` has been copied by its replica.
    pub fn wait_replicated(&self, port: u16) {
        poll(PATIENCE, || {
            replica_caught_up(&self.cli_at(port, &["INFO", "replication"])).then_some(())
        })
        .expect("the replica caught up");
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the API tests need of a Redis deployment, single server or cluster.
pub trait Backend {
    fn url(&self) -> String;
    /// Every key.
    fn keys(&self) -> Vec<String>;
    /// One command (routed to the key's node), raw output lines.
    fn raw(&self, args: &[&str]) -> Vec<String>;
    /// Commands processed so far, over all nodes.
    fn commands_processed(&self) -> u64;
    /// How much one `commands_processed` call adds itself.
    fn info_cost(&self) -> u64;
}

impl Backend for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
    fn keys(&self) -> Vec<String> {
        RedisServer::keys(self)
    }
    fn raw(&self, args: &[&str]) -> Vec<String> {
        RedisServer::raw(self, args)
    }
    fn commands_processed(&self) -> u64 {
        RedisServer::commands_processed(self)
    }
    fn info_cost(&self) -> u64 {
        1
    }
}

impl Backend for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }
    fn keys(&self) -> Vec<String> {
        RedisCluster::keys(self)
    }
    fn raw(&self, args: &[&str]) -> Vec<String> {
        RedisCluster::raw(self, args)
    }
    fn commands_processed(&self) -> u64 {
        self.live_ports()
            .iter()
            .map(|&p| {
                self.cli_at(p, &["INFO", "stats"])
                    .lines()
                    .find_map(|l| l.strip_prefix("total_commands_processed:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
    fn info_cost(&self) -> u64 {
        self.live_ports().len() as u64
    }
}

/// `redis-server` on loopback `port` with its data in `dir`, quiet; callers
/// add persistence and mode options.
pub fn redis_server(port: u16, dir: &Path) -> Command {
    let mut c = Command::new("redis-server");
    c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args([
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--loglevel",
            "warning",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Whether a primary's `INFO replication` shows its first replica at the
/// primary's own offset.
pub fn replica_caught_up(info: &str) -> bool {
    let master: Option<u64> = info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok());
    let replica: Option<u64> = info
        .lines()
        .find(|l| l.starts_with("slave0:"))
        .and_then(|l| l.split(',').find_map(|kv| kv.strip_prefix("offset=")))
        .and_then(|v| v.parse().ok());
    matches!((master, replica), (Some(m), Some(r)) if r >= m)
}

/// Runs `redis-cli OPTIONS ARGS...` and returns its output lines.
pub fn redis_cli_lines(options: &[&str], args: &[&str]) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args(options)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
