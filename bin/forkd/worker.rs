//! The program the supervisor forks: the HTTP worker over the shared
//! scoreboard, with a reloadable configuration.

use std::path::PathBuf;
use std::sync::Arc;

use forkd_config::Config;
use forkd_supervisor::{Program, Settings, WorkerCell, WorkerContext};

use crate::logging;
use crate::settings::{app_settings, heartbeat_interval, load_tls, supervisor_settings, Tls};
use crate::source::ConfigSource;

/// The program the supervisor forks: the HTTP worker, with reloadable
/// configuration.
pub(crate) struct Forkd {
    pub(crate) source: ConfigSource,
    pub(crate) config: Config,
    /// The certificate and key, and the routes' TLS client settings, read
    /// by this process, inherited by workers.
    pub(crate) tls: Tls,
    /// Session-ticket keys for every worker of this configuration; a
    /// reload rotates them.
    pub(crate) tickets: forkd_app::TicketKeys,
    pub(crate) previous: Option<(Config, Tls, forkd_app::TicketKeys)>,
    /// Where the configuration came from (read once, at start).
    pub(crate) described: String,
}

impl Program for Forkd {
    fn run_worker(&self, ctx: WorkerContext) -> i32 {
        logging::set_worker(ctx.slot);
        forkd_app::run(forkd_app::Worker {
            slot: ctx.slot,
            generation: ctx.generation,
            listeners: ctx.listeners,
            shared_listeners: ctx.shared_listeners,
            settings: app_settings(&self.config, &self.tls, &self.tickets),
            host: Arc::new(CellHost {
                cell: ctx.cell,
                fresh_ms: forkd_supervisor::heartbeat_fresh_ms(heartbeat_interval(&self.config)),
                log_file: ctx.log_file,
            }),
        })
    }

    fn reload(&mut self) -> Result<Settings, String> {
        let new = self.source.load().map_err(|e| e.to_string())?;
        // The sockets stay as they were bound, and each listener's protocol
        // (TLS, PROXY, redirect) belongs to its address: a reload cannot
        // move one to another.
        let addrs = |c: &Config| c.listen.iter().map(|l| l.address).collect::<Vec<_>>();
        if addrs(&new) != addrs(&self.config) {
            return Err(format!(
                "`listen` changed ({} -> {}): restart forkd to apply it; \
                 the workers keep their listeners",
                describe_listen(&self.config),
                describe_listen(&new)
            ));
        }
        // A bad certificate or key refuses the whole reload: the workers
        // keep serving the pair they have.
        let tls = load_tls(&new)?;
        let tickets = self.tickets.rotate()?;
        let settings = supervisor_settings(&new, tls.server.as_deref(), &self.described);
        let config = std::mem::replace(&mut self.config, new);
        let tls = std::mem::replace(&mut self.tls, tls);
        let tickets = std::mem::replace(&mut self.tickets, tickets);
        self.previous = Some((config, tls, tickets));
        Ok(settings)
    }

    fn abandon_reload(&mut self) {
        if let Some((config, tls, tickets)) = self.previous.take() {
            self.config = config;
            self.tls = tls;
            self.tickets = tickets;
        }
    }
}

fn describe_listen(c: &Config) -> String {
    c.listen
        .iter()
        .map(|l| l.address.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A worker's view of its scoreboard cell.
pub(crate) struct CellHost {
    cell: WorkerCell,
    /// How old another worker's heartbeat may be for it to count as live.
    fresh_ms: u64,
    log_file: Option<PathBuf>,
}

impl forkd_app::Host for CellHost {
    fn heartbeat(&self) {
        self.cell.heartbeat();
    }
    fn ready(&self) {
        self.cell.set_ready();
    }
    fn draining(&self) {
        self.cell.set_draining();
    }
    fn request_served(&self) {
        self.cell.count_request();
    }
    fn count(&self, k: usize, n: u64) {
        self.cell.add(k, n);
    }
    fn totals(&self) -> Vec<u64> {
        self.cell.totals().to_vec()
    }
    fn supervisor_figures(&self) -> (u64, u64) {
        self.cell.supervisor_figures()
    }
    fn set_redis_info(&self, text: &str) {
        self.cell.set_info(text);
    }
    fn now_ms(&self) -> u64 {
        forkd_supervisor::now_ms()
    }
    fn set_in_flight(&self, n: u64, oldest: Option<(u64, &str, &str)>) {
        self.cell.set_in_flight(n, oldest);
    }
    fn set_in_flight_count(&self, n: u64) {
        self.cell.set_in_flight_count(n);
    }
    fn set_connections(&self, n: u64) {
        self.cell.set_connections(n);
    }
    fn fewest_connections_elsewhere(&self) -> Option<u64> {
        self.cell.fewest_connections_elsewhere(self.fresh_ms)
    }
    fn set_hash_queue(&self, n: u64) {
        self.cell.set_hash_queue(n);
    }
    fn stopping(&self) -> bool {
        self.cell.supervisor_stopping()
    }
    fn workers(&self) -> Vec<forkd_app::WorkerGauges> {
        self.cell
            .activities()
            .into_iter()
            .map(|w| forkd_app::WorkerGauges {
                slot: w.slot,
                pid: w.pid,
                in_flight: w.activity.in_flight,
                connections: w.activity.connections,
                hash_queue: w.activity.hash_queue,
            })
            .collect()
    }
    fn supervisor_gauges(&self) -> forkd_app::SupervisorGauges {
        let f = self.cell.supervisor_activity();
        forkd_app::SupervisorGauges {
            accept_queue: f.accept_queue,
            accept_backlog: f.accept_backlog,
            recycles: forkd_supervisor::plan::RecycleReason::ALL
                .iter()
                .map(|r| r.name())
                .zip(f.recycles)
                .collect(),
        }
    }
    fn reopen_log(&self) {
        if let Some(path) = &self.log_file {
            if let Err(e) = forkd_supervisor::redirect_output(path) {
                log::error!("{e}");
            }
        }
    }
}

const _: () = assert!(forkd_app::COUNTERS_USED <= forkd_supervisor::COUNTERS);
const _: () = assert!(forkd_app::MORE_COUNTERS_AT == forkd_supervisor::COUNTERS);
const _: () = assert!(forkd_app::MORE_COUNTERS_USED <= forkd_supervisor::MORE_COUNTERS);
const _: () = assert!(forkd_config::MAX_WORKERS == forkd_supervisor::MAX_WORKERS);
