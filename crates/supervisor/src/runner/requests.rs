//! The control socket's side of the supervisor: accepting connections,
//! answering requests, the replies that wait for an outcome, and status.

use super::{ready_slots, Supervisor, MAX_CONTROL_CONNS};
use crate::control::{
    AcceptQueue, Awaiting, Conn, OldestRequest, ReadResult, Reply, Request, Status, WorkerStatus,
};
use crate::plan::{Phase, RecycleReason, ReloadOutcome};
use crate::scoreboard::{now_ms, ActivityView, WorkerState};
use crate::Program;

impl<P: Program> Supervisor<P> {
    /// Answers every connection waiting for a reload.
    pub(super) fn reply_reload(&mut self, outcome: ReloadOutcome) {
        for c in &mut self.conns {
            if c.awaiting == Some(Awaiting::Reload) {
                c.awaiting = None;
                let _ = c.send(&Reply::Reload(outcome.clone()));
            }
        }
    }

    /// Accepts new connections and serves every open one.
    pub(super) fn serve_control(&mut self) {
        while let Ok((stream, _)) = self.control.accept() {
            if self.conns.len() >= MAX_CONTROL_CONNS {
                log::warn!("too many control connections; refusing one");
                continue;
            }
            match Conn::new(stream) {
                Ok(c) => self.conns.push(c),
                Err(e) => log::warn!("control connection: {e}"),
            }
        }
        let mut i = 0;
        while i < self.conns.len() {
            if self.serve_conn(i) {
                i += 1;
            } else {
                self.conns.swap_remove(i);
            }
        }
    }

    /// Sends what waits for connection `i` and answers every complete
    /// request it has sent. Returns whether it stays open.
    fn serve_conn(&mut self, i: usize) -> bool {
        if self.conns[i].flush().is_err() || self.conns[i].broken() {
            return false;
        }
        loop {
            match self.conns[i].read() {
                ReadResult::Pending => return true,
                ReadResult::Closed => return false,
                ReadResult::Invalid(message) => {
                    let _ = self.conns[i].send(&Reply::Error { message });
                    return false;
                }
                ReadResult::Request(req) => {
                    self.handle_request(i, req);
                    if self.conns[i].broken() {
                        return false;
                    }
                }
            }
        }
    }

    /// Answers one request, now or (reload, upgrade, stop) when its
    /// outcome is known.
    fn handle_request(&mut self, i: usize, req: Request) {
        let now = now_ms();
        match req {
            Request::Status => {
                let status = self.status(now);
                let _ = self.conns[i].send(&Reply::Status(Box::new(status)));
            }
            Request::Stop { timeout } => self.stop_request(i, timeout, now),
            Request::Reload => {
                if self.plan.phase() != Phase::Running {
                    let _ = self.conns[i].send(&Reply::Error {
                        message: "forkd is stopping".into(),
                    });
                    return;
                }
                self.conns[i].awaiting = Some(Awaiting::Reload);
                let actions = self.reload(now);
                self.execute(actions);
            }
            Request::Upgrade => self.start_upgrade(Some(i)),
            Request::Scale { workers } => {
                let reply = self.scale_request(workers, now);
                let _ = self.conns[i].send(&reply);
            }
        }
    }

    fn stop_request(&mut self, i: usize, timeout: Option<f64>, now: u64) {
        let ms = match timeout {
            Some(t) if t.is_finite() && t >= 0.0 => (t * 1000.0) as u64,
            _ => self.settings.live.shutdown_timeout.as_millis() as u64,
        };
        let delay = self.settings.live.shutdown_delay.as_millis() as u64;
        let _ = self.conns[i].send(&Reply::Stopping {
            pid: self.pid,
            // What the client should wait for: the delay, then the drain.
            drain_ms: ms + delay,
        });
        // Kept open: it closes when the supervisor exits.
        self.conns[i].awaiting = Some(Awaiting::Exit);
        if self.plan.phase() == Phase::Running || self.plan.stop_pending() {
            let actions = self.begin_stop(now, ms);
            self.execute(actions);
        }
    }

    fn scale_request(&mut self, workers: usize, now: u64) -> Reply {
        let max = crate::MAX_WORKERS;
        if !(1..=max).contains(&workers) {
            return Reply::Error {
                message: format!("cannot scale to {workers}: expected 1 to {max} workers"),
            };
        }
        if self.plan.phase() != Phase::Running {
            return Reply::Error {
                message: "forkd is stopping".into(),
            };
        }
        let actions = self.scale(workers, now);
        self.execute(actions);
        Reply::Scaled { workers }
    }

    fn status(&self, now: u64) -> Status {
        let slots = self.plan.slots();
        let latency = &self.settings.live.latency;
        let buckets = if latency.bounds.is_empty() {
            0
        } else {
            latency.bounds.len() + 1
        };
        let mut workers: Vec<WorkerStatus> = self
            .plan
            .workers()
            .iter()
            .map(|w| {
                let v = self.board.view(w.cell);
                let a = self.board.activity(w.cell);
                let state = match w.leaving {
                    Some(_) if v.state != WorkerState::Draining => "stopping",
                    _ => v.state.name(),
                };
                WorkerStatus {
                    slot: w.slot,
                    pid: w.pid,
                    generation: w.generation,
                    state: state.to_owned(),
                    uptime_ms: now.saturating_sub(w.spawned_ms),
                    requests: v.requests,
                    rss_bytes: rss_bytes(w.pid),
                    restarts: slots.get(w.slot).map_or(0, |s| s.restarts),
                    heartbeat_age_ms: now.saturating_sub(v.heartbeat_ms),
                    redis: crate::scoreboard::info_text(&v.info),
                    in_flight: a.in_flight,
                    connections: a.connections,
                    hash_queue: a.hash_queue,
                    oldest: a.oldest.map(|o| OldestRequest {
                        age_ms: now.saturating_sub(o.started_ms),
                        what: o.what,
                        request_id: o.request_id,
                    }),
                    last_replaced: slots.get(w.slot).and_then(|s| s.last_replaced.clone()),
                    latency_buckets: self.board.counters(w.cell, latency.first, buckets),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.generation, w.pid));
        let ready = ready_slots(&self.plan, &self.board);
        Status {
            instance: self.settings.fixed.instance.clone(),
            pid: self.pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build: self.settings.fixed.build.clone(),
            listen: crate::listen::describe(&self.sockets.addrs()),
            // As bound: a configured port 0 has become the real port.
            listeners: {
                let mut l = self.settings.live.listeners.clone();
                for (l, a) in l.iter_mut().zip(self.sockets.addrs()) {
                    l.address = a.to_string();
                }
                l
            },
            routes: self.settings.live.routes.clone(),
            config_source: self.settings.live.config_source.clone(),
            config: self.settings.live.config.clone(),
            latency_bounds: latency.bounds.clone(),
            listener: self.settings.fixed.listener.name().to_owned(),
            generation: self.plan.generation(),
            phase: match (self.plan.phase(), self.plan.reloading()) {
                (Phase::Stopping, _) => "stopping",
                (Phase::Running, true) => "reloading",
                (Phase::Running, false) => "running",
            }
            .to_owned(),
            uptime_ms: now.saturating_sub(self.started_ms),
            workers_wanted: self.plan.target(),
            workers_ready: ready,
            rss_bytes: rss_bytes(self.pid),
            workers,
            redis: self.redis.as_ref().map(|r| crate::control::RedisStatus {
                pid: r.pid,
                socket: r.socket().display().to_string(),
            }),
            backoff: slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.respawn_at_ms?.saturating_sub(now))))
                .collect(),
            accept_queue: {
                let (queued, backlog) = self.accept_queue();
                AcceptQueue { queued, backlog }
            },
            recycled: RecycleReason::ALL
                .iter()
                .zip(self.plan.recycled())
                .map(|(r, n)| (r.name().to_owned(), n))
                .collect(),
            recycling: self
                .plan
                .recycling_now()
                .map(|(s, why)| (s, why.to_owned())),
            certificates: self.settings.live.certificates.clone(),
        }
    }
}

/// What a worker's cell says it is doing, for the log.
pub(super) fn describe_activity(a: &ActivityView, now: u64) -> String {
    let mut text = format!("{} request(s) in flight", a.in_flight);
    if let Some(o) = &a.oldest {
        text += &format!(
            "; the oldest: {} (request id {}) for {} ms",
            o.what,
            o.request_id,
            now.saturating_sub(o.started_ms)
        );
    }
    text + &format!(", {} open connection(s)", a.connections)
}

/// Resident set size of `pid`, from /proc (0 when it cannot be read).
pub(super) fn rss_bytes(pid: i32) -> u64 {
    let pages = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    pages * page
}
