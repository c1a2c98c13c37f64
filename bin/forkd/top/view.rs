//! What `forkd top` draws: the instance and its rates, a sparkline of
//! requests a second, the workers, the routes, Redis, and the keys.

use ratatui::backend::TestBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Sparkline, Table};
use ratatui::{Frame, Terminal};

use super::Model;
use crate::cli::{bytes, duration, listening};

/// One frame as text, `width` x `height` (for `--once`).
pub(super) fn text(model: &Model, width: u16, height: u16) -> String {
    let mut terminal = match Terminal::new(TestBackend::new(width, height)) {
        Ok(t) => t,
        Err(e) => match e {},
    };
    if let Err(e) = terminal.draw(|f| draw(f, model)) {
        match e {}
    }
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let line: String = (0..width)
            .filter_map(|x| buffer.cell((x, y)).map(|c| c.symbol().to_owned()))
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Requests a second as shown: whole above 10, one decimal below.
fn per_second(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn millis(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s.is_finite() => format!("≤{} ms", ms(s)),
        Some(_) => "over the last bucket".into(),
        None => "-".into(),
    }
}

/// Seconds as milliseconds, to the microsecond (a bucket's bound prints as
/// written: 0.025 s is 25, not 25.000000000000004).
fn ms(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e3
}

/// A quantile in a table's column: `≤2.5ms`, `>2.5s` past the last bound.
fn short_millis(seconds: Option<f64>, last_bound: Option<f64>) -> String {
    match (seconds, last_bound) {
        (Some(s), _) if s.is_finite() => format!("≤{}ms", ms(s)),
        (Some(_), Some(b)) => format!(">{b}s"),
        (Some(_), None) => "over".into(),
        (None, _) => "-".into(),
    }
}

pub(super) fn draw(f: &mut Frame, m: &Model) {
    let s = &m.now.status;
    let routes = route_rows(m);
    let redis_text = redis_text(m);
    let [head, spark, workers, table, redis, _, keys] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(s.workers.len() as u16 + 3),
        Constraint::Length(routes.len() as u16 + 3),
        Constraint::Length(redis_text.len() as u16 + 2),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(f.area());
    header(f, m, head);
    let requests = m.rate(|x| x.sum("forkd_http_requests_total"));
    let history: Vec<u64> = m.history.iter().copied().collect();
    let peak = history.iter().copied().max().unwrap_or(0);
    f.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(format!(
                " requests/s: {} now, {} peak (last {} s) ",
                per_second(requests),
                peak,
                history.len()
            )))
            .data(&history),
        spark,
    );
    worker_table(f, m, workers);
    route_table(f, routes, table);
    f.render_widget(
        Paragraph::new(redis_text.into_iter().map(Line::from).collect::<Vec<_>>())
            .block(Block::default().borders(Borders::ALL).title(" redis ")),
        redis,
    );
    let mut hint = format!(
        " q quit  r reload  +/- scale ({} worker(s) wanted)",
        s.workers_wanted
    );
    if !m.message.is_empty() {
        hint.push_str(&format!("  | {}", m.message));
    }
    f.render_widget(
        Paragraph::new(hint).style(Style::default().add_modifier(Modifier::REVERSED)),
        keys,
    );
}

fn header(f: &mut Frame, m: &Model, area: Rect) {
    let s = &m.now.status;
    let rate = |name: &'static str| m.rate(move |x| x.sum(name));
    let class = |c: &'static str| {
        m.rate(move |x| {
            x.by("forkd_http_requests_total", "status")
                .get(c)
                .copied()
                .unwrap_or(0.0)
        })
    };
    let near = {
        let hits = m.rate(|x| x.sum("forkd_near_cache_hits_total"));
        let misses = m.rate(|x| x.sum("forkd_near_cache_misses_total"));
        if hits + misses > 0.0 {
            format!("{:.0} %", 100.0 * hits / (hits + misses))
        } else {
            "-".into()
        }
    };
    let lines = vec![
        Line::from(format!(
            "forkd {} '{}' pid {} {} generation {} up {}  {}/{} ready  RSS {}",
            s.version,
            s.instance,
            s.pid,
            s.phase,
            s.generation,
            duration(s.uptime_ms),
            s.workers_ready,
            s.workers_wanted,
            bytes(s.rss_bytes)
        )),
        Line::from(format!(
            "listening on {}  ({} listener)  config: {}",
            listening(s),
            s.listener,
            s.config_source
        )),
        Line::from(match &m.now.metrics {
            Ok(_) => format!(
                "latency p50 {}  p99 {}   4xx {}/s  5xx {}/s  rate-limited {}/s",
                millis(m.quantile(0.5)),
                millis(m.quantile(0.99)),
                per_second(class("4xx")),
                per_second(class("5xx")),
                per_second(rate("forkd_rate_limited_requests_total")),
            ),
            Err(why) => why.clone(),
        }),
        Line::from(match &m.now.metrics {
            Ok(_) => format!(
                "upstream failures {}/s  redis errors {}/s  near-cache hits {}",
                per_second(rate("forkd_upstream_failures_total")),
                per_second(rate("forkd_redis_errors_total")),
                near
            ),
            Err(_) => String::new(),
        }),
        Line::from(format!(
            "accept queue {}/{}",
            s.accept_queue.queued, s.accept_queue.backlog
        )),
    ];
    f.render_widget(Paragraph::new(lines), area);
}

fn worker_table(f: &mut Frame, m: &Model, area: Rect) {
    let s = &m.now.status;
    let last_bound = s.latency_bounds.last().copied();
    let rows = s.workers.iter().map(|w| {
        Row::new(vec![
            w.slot.to_string(),
            w.pid.to_string(),
            w.generation.to_string(),
            w.state.clone(),
            per_second(m.worker_rate(w.pid, w.requests)),
            short_millis(m.worker_quantile(w.pid, 0.5), last_bound),
            short_millis(m.worker_quantile(w.pid, 0.99), last_bound),
            w.in_flight.to_string(),
            w.connections.to_string(),
            bytes(w.rss_bytes),
            w.restarts.to_string(),
            duration(w.uptime_ms),
            w.last_replaced.clone().unwrap_or_default(),
        ])
    });
    let widths = [
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(4),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Min(10),
    ];
    let header = Row::new(vec![
        "SLOT",
        "PID",
        "GEN",
        "STATE",
        "REQ/S",
        "P50",
        "P99",
        "INFLIGHT",
        "CONNS",
        "RSS",
        "RESTARTS",
        "UPTIME",
        "LAST REPLACED",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(" workers ")),
        area,
    );
}

/// The configured routes, then the built-in ones that were asked for:
/// route, upstream, requests, 4xx and 5xx a second.
fn route_rows(m: &Model) -> Vec<[String; 5]> {
    let by_class = |route: &str, class: Option<&'static str>| {
        let route = route.to_owned();
        m.rate(move |x| {
            x.0.iter()
                .filter(|(k, _)| k.starts_with("forkd_http_requests_total{"))
                .filter(|(k, _)| super::label_value(k, "route").as_deref() == Some(route.as_str()))
                .filter(|(k, _)| {
                    class.is_none_or(|c| super::label_value(k, "status").as_deref() == Some(c))
                })
                .map(|(_, v)| v)
                .sum()
        })
    };
    let row = |name: &str, upstream: String| {
        [
            name.to_owned(),
            upstream,
            per_second(by_class(name, None)),
            per_second(by_class(name, Some("4xx"))),
            per_second(by_class(name, Some("5xx"))),
        ]
    };
    let mut rows: Vec<[String; 5]> = m
        .now
        .status
        .routes
        .iter()
        .map(|r| row(&r.prefix, r.upstream.clone()))
        .collect();
    for name in ["login", "logout", "profile", "healthz", "readyz", "metrics"] {
        if by_class(name, None) > 0.0 {
            rows.push(row(name, "(built in)".to_owned()));
        }
    }
    rows
}

fn route_table(f: &mut Frame, rows: Vec<[String; 5]>, area: Rect) {
    let widths = [
        Constraint::Length(16),
        Constraint::Min(24),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
    ];
    let header = Row::new(vec!["ROUTE", "UPSTREAM", "REQ/S", "4XX/S", "5XX/S"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    f.render_widget(
        Table::new(rows.into_iter().map(Row::new), widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(" routes ")),
        area,
    );
}

/// The managed redis-server, and each worker's Redis line (its mode,
/// nodes and near cache), the same ones once.
fn redis_text(m: &Model) -> Vec<String> {
    let s = &m.now.status;
    let mut lines: Vec<String> = s
        .workers
        .iter()
        .map(|w| format!("slot {}: {}", w.slot, w.redis))
        .collect();
    lines.dedup();
    if let Some(r) = &s.redis {
        let pid = r
            .pid
            .map_or("not running".to_owned(), |p| format!("pid {p}"));
        lines.insert(0, format!("managed redis-server: {pid} on {}", r.socket));
    }
    lines
}
