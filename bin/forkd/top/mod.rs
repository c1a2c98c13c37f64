//! `forkd top`: a live view of a running instance, from its control socket
//! (`status`) and its `/metrics`, sampled every second; keys reload and
//! scale it. `--once` prints one frame (after two samples, for the rates)
//! and exits, for scripts and docs.

mod view;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forkd_supervisor::control::{Reply, Request, Status};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::cli::{connect, expect_ok, fetch_status};
use crate::source::Target;

/// How often a sample is taken.
const TICK: Duration = Duration::from_secs(1);
/// Samples of the request rate the sparkline shows.
const HISTORY: usize = 120;
/// The most of `/metrics` read.
const MAX_METRICS_BYTES: u64 = 4 << 20;

/// One look at the instance.
pub(crate) struct Sample {
    at: Instant,
    status: Status,
    /// `/metrics`, or why there is none.
    metrics: Result<Metrics, String>,
}

/// A Prometheus text exposition: each series (`name{labels}`) and its value.
#[derive(Default)]
pub(crate) struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Metrics(series)
    }

    /// Every series of `name`, summed.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.as_str() == name || k.strip_prefix(name).is_some_and(|r| r.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The series of `name` summed by the value of `label`.
    fn by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.0 {
            let Some(labels) = k.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
                continue;
            };
            if let Some(value) = label_value(labels, label) {
                *out.entry(value).or_default() += v;
            }
        }
        out
    }
}

/// `label`'s value in `a="x",b="y"}`.
fn label_value(labels: &str, label: &str) -> Option<String> {
    let start = labels.find(&format!("{label}=\""))? + label.len() + 2;
    let rest = &labels[start..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// What the screen shows, made from the last two samples.
pub(crate) struct Model {
    pub(crate) now: Sample,
    pub(crate) prev: Option<Sample>,
    /// Requests a second, oldest first.
    pub(crate) history: VecDeque<u64>,
    /// The answer to the last key that asked something of forkd.
    pub(crate) message: String,
}

impl Model {
    fn seconds(&self) -> f64 {
        self.prev
            .as_ref()
            .map_or(0.0, |p| self.now.at.duration_since(p.at).as_secs_f64())
    }

    /// The rate of `f` between the two samples (0 without both).
    pub(crate) fn rate(&self, f: impl Fn(&Metrics) -> f64) -> f64 {
        let (Some(prev), Ok(now)) = (&self.prev, &self.now.metrics) else {
            return 0.0;
        };
        let Ok(before) = &prev.metrics else {
            return 0.0;
        };
        let dt = self.seconds();
        if dt <= 0.0 {
            return 0.0;
        }
        // A counter that went down (a reload renamed the routes): no rate.
        (f(now) - f(before)).max(0.0) / dt
    }

    /// A worker's requests a second (0 for one not in the last sample).
    pub(crate) fn worker_rate(&self, pid: i32, requests: u64) -> f64 {
        let Some(prev) = &self.prev else {
            return 0.0;
        };
        let dt = self.seconds();
        prev.status
            .workers
            .iter()
            .find(|w| w.pid == pid)
            .filter(|_| dt > 0.0)
            .map_or(0.0, |w| requests.saturating_sub(w.requests) as f64 / dt)
    }

    /// The `q` quantile of request durations between the samples, as the
    /// upper bound of the histogram bucket it falls in (seconds).
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let (Some(prev), Ok(now)) = (&self.prev, &self.now.metrics) else {
            return None;
        };
        let before = prev.metrics.as_ref().ok()?;
        let name = "forkd_http_request_duration_seconds_bucket";
        let (now, before) = (now.by(name, "le"), before.by(name, "le"));
        let mut buckets: Vec<(f64, f64)> = now
            .iter()
            .map(|(le, n)| {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                (bound, n - before.get(le).copied().unwrap_or(0.0))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        quantile_of(&buckets, q)
    }

    /// A worker's `q` quantile of request durations between the samples,
    /// from the histogram `forkd status` gives of each worker (None for a
    /// worker not in both samples, or that answered nothing in between).
    pub(crate) fn worker_quantile(&self, pid: i32, q: f64) -> Option<f64> {
        let prev = self.prev.as_ref()?;
        let find = |s: &Status| s.workers.iter().find(|w| w.pid == pid).cloned();
        let (now, before) = (find(&self.now.status)?, find(&prev.status)?);
        let bounds = &self.now.status.latency_bounds;
        let n = now.latency_buckets.len();
        if n != bounds.len() + 1 || before.latency_buckets.len() != n || bounds.is_empty() {
            return None;
        }
        let mut cumulative = 0.0;
        let buckets: Vec<(f64, f64)> = now
            .latency_buckets
            .iter()
            .zip(&before.latency_buckets)
            .enumerate()
            .map(|(i, (n, b))| {
                cumulative += n.saturating_sub(*b) as f64;
                (bounds.get(i).copied().unwrap_or(f64::INFINITY), cumulative)
            })
            .collect();
        quantile_of(&buckets, q)
    }
}

/// The upper bound of the bucket the `q` quantile falls in, from (bound,
/// cumulative count) pairs in the order of their bounds; None for none.
fn quantile_of(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= q * total)
        .map(|(bound, _)| *bound)
}

/// Asks the instance for its status and its metrics.
fn sample(target: &Target) -> anyhow::Result<Sample> {
    let status = fetch_status(target)?;
    let metrics = metrics_address(&status)
        .ok_or_else(|| "no /metrics: no plain-HTTP listener to ask".to_owned())
        .and_then(|addr| fetch_metrics(addr).map_err(|e| format!("no /metrics from {addr}: {e}")));
    Ok(Sample {
        at: Instant::now(),
        status,
        metrics,
    })
}

/// The first listener that speaks plain HTTP itself (no TLS, no redirect,
/// no PROXY header expected), on loopback when it listens on every
/// address.
fn metrics_address(s: &Status) -> Option<SocketAddr> {
    let plain = s
        .listeners
        .iter()
        .find(|l| l.scheme == "http" && !l.redirect_https && !l.proxy_protocol)?;
    let mut addr: SocketAddr = plain.address.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Some(addr)
}

/// `GET /metrics` over one HTTP/1.1 connection, within a second.
fn fetch_metrics(addr: SocketAddr) -> Result<Metrics, String> {
    let mut s = TcpStream::connect_timeout(&addr, TICK).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TICK)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TICK)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.take(MAX_METRICS_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no answer")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("answered {status} (see metrics.allow)"));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err("a chunked answer".into());
    }
    Ok(Metrics::parse(body))
}

/// What a key asked of forkd, answered on a thread of its own (a reload
/// waits for every worker to be replaced).
fn ask(target: &Target, request: Request, done: mpsc::Sender<String>) {
    let target = target.clone();
    std::thread::spawn(move || {
        let answer = connect(&target)
            .and_then(|mut c| Ok(c.request(&request, Duration::from_secs(3600))?))
            .and_then(expect_ok);
        let said = match answer {
            Ok(Reply::Reload(o)) => match (o.error, o.workers) {
                (Some(e), _) => format!("reload failed: {e}"),
                (None, Some([from, to])) => format!(
                    "reloaded: generation {}, workers {from} -> {to} (the config's)",
                    o.generation
                ),
                (None, None) => format!("reloaded: generation {}", o.generation),
            },
            Ok(Reply::Scaled { workers }) => format!("scaling to {workers} worker(s)"),
            Ok(other) => format!("unexpected answer: {other:?}"),
            Err(e) => format!("{e:#}"),
        };
        let _ = done.send(said);
    });
}

pub(crate) fn run(target: &Target, once: bool) -> anyhow::Result<()> {
    let first = sample(target)?;
    let mut model = Model {
        now: first,
        prev: None,
        history: VecDeque::with_capacity(HISTORY),
        message: String::new(),
    };
    if once {
        std::thread::sleep(TICK);
        next(&mut model, sample(target)?);
        out!("{}", view::text(&model, 120, 40));
        return Ok(());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        anyhow::bail!("forkd top needs a terminal; forkd top --once prints one frame");
    }
    let mut terminal = ratatui::try_init()?;
    let result = live(target, &mut model, &mut terminal);
    ratatui::restore();
    result
}

/// Moves the model on to a new sample.
fn next(model: &mut Model, s: Sample) {
    let prev = std::mem::replace(&mut model.now, s);
    model.prev = Some(prev);
    let rate = model.rate(|m| m.sum("forkd_http_requests_total"));
    if model.history.len() == HISTORY {
        model.history.pop_front();
    }
    model.history.push_back(rate.round() as u64);
}

fn live(
    target: &Target,
    model: &mut Model,
    terminal: &mut ratatui::DefaultTerminal,
) -> anyhow::Result<()> {
    let (tx, answers) = mpsc::channel();
    // Samples are taken on a thread of their own, so that a slow instance
    // never holds the screen or the keys back.
    let (sent, samples) = mpsc::channel();
    let sampled = target.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(TICK);
        if sent
            .send(sample(&sampled).map_err(|e| format!("{e:#}")))
            .is_err()
        {
            return;
        }
    });
    loop {
        terminal.draw(|f| view::draw(f, model))?;
        if event::poll(Duration::from_millis(100))? {
            if let Event::Key(k) = event::read()? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                let workers = model.now.status.workers_wanted;
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('r') => {
                        model.message = "reloading…".into();
                        ask(target, Request::Reload, tx.clone());
                    }
                    KeyCode::Char('+') => {
                        ask(
                            target,
                            Request::Scale {
                                workers: workers + 1,
                            },
                            tx.clone(),
                        );
                    }
                    KeyCode::Char('-') if workers > 1 => {
                        ask(
                            target,
                            Request::Scale {
                                workers: workers - 1,
                            },
                            tx.clone(),
                        );
                    }
                    _ => {}
                }
            }
        }
        for said in answers.try_iter() {
            model.message = said;
        }
        for s in samples.try_iter() {
            match s {
                Ok(s) => next(model, s),
                Err(e) => model.message = e,
            }
        }
    }
}
