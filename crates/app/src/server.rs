//! The worker's runtime, accept loop and graceful drain.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, Instant};

use crate::access::AccessLog;
use crate::state::State;
use crate::Worker;

/// After SIGTERM, how long kept-alive connections may send one more
/// request (answered with `Connection: close`) before idle ones are closed.
/// Closing an idle connection at once races with a client that is just
/// sending on it; this window makes that race practically vanish.
const LINGER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Graceful,
    Fast,
}

/// Runs a worker to completion and returns the process exit code.
pub fn run(w: Worker) -> i32 {
    #[cfg(feature = "failpoints")]
    if failpoint("worker-start") {
        log::error!("cannot start: failpoint worker-start is set (FORKD_FAILPOINTS)");
        return 1;
    }
    #[cfg(feature = "failpoints")]
    if failpoint("worker-hang") {
        // Never ready, until a signal ends it (no handler is installed yet).
        log::error!("failpoint worker-hang is set (FORKD_FAILPOINTS): never ready");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    // Blocking threads run the password checks, each keeping its argon2
    // memory (see secrets): no more of them than checks may run at once
    // (at least two, so that a DNS lookup never waits long), gone 2 s after
    // the last login, so
    // that an idle worker holds none of that memory.
    let hashes = w.settings.auth.max_concurrent_hashes;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(hashes.max(2))
        .thread_keep_alive(Duration::from_secs(2))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot build the tokio runtime: {e}");
            return 1;
        }
    };
    rt.block_on(serve(w))
}

#[cfg(feature = "failpoints")]
fn failpoint(name: &str) -> bool {
    std::env::var("FORKD_FAILPOINTS").is_ok_and(|v| v.split(',').any(|p| p.trim() == name))
}

/// The worker's life, one step per function: the store, the shared state,
/// the heartbeat, the accept loop, the drain.
async fn serve(w: Worker) -> i32 {
    let Worker {
        slot,
        generation,
        listener,
        settings,
        host,
    } = w;
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot use the listening socket: {e}");
            return 1;
        }
    };
    let access = match settings
        .access_log
        .as_ref()
        .map(AccessLog::start)
        .transpose()
    {
        Ok(a) => a,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    let Some(store) = connect_store(&settings.store).await else {
        return 1;
    };
    let state = Arc::new(State::new(
        slot,
        generation,
        host.clone(),
        settings.clone(),
        store,
        access,
    ));
    // The hash verified for unknown users, made before the first login, and
    // what verifying it takes here.
    let dummy = state.dummy.clone();
    tokio::task::spawn_blocking(move || dummy.prepare());
    spawn_heartbeat(&state, settings.heartbeat_interval);
    let (stop_tx, stop_rx) = watch::channel(None);
    if let Err(e) = watch_signals(stop_tx, state.clone()) {
        log::error!("cannot install signal handlers: {e}");
        return 1;
    }
    // This worker's TLS configuration (and session-ticket keys), made
    // after the fork.
    let protocols = match crate::connection::Protocols::new(&settings) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    host.ready();
    log::debug!("accepting connections");
    let stop = accept_loop(listener, protocols, &state, stop_rx).await;
    // The listener is closed: queued connections go to the other workers.
    state.draining.store(true, Relaxed);
    host.draining();
    drain(&state.conns, stop, settings.shutdown_timeout).await;
    if let Some(a) = &state.access {
        a.finish();
        if a.dropped() > 0 {
            log::warn!(
                "access log: {} line(s) dropped: the writer could not keep up",
                a.dropped()
            );
        }
    }
    0
}

/// One Redis client per worker, made here, inside the runtime, after the
/// fork. It connects (and reconnects) in the background: the worker serves
/// at once and answers 503 for what needs Redis until it is up.
async fn connect_store(cfg: &forkd_store::StoreConfig) -> Option<forkd_store::Store> {
    let store = match forkd_store::Store::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return None;
        }
    };
    store.start();
    // Give Redis a moment before taking requests, so that a new worker of a
    // rolling reload serves from its first request; if Redis is down, serve
    // anyway (503 for what needs it) and connect when it appears.
    if let Err(e) = store.wait_connected(cfg.connect_timeout).await {
        log::warn!("starting without Redis: {e}");
    }
    Some(store)
}

/// The heartbeat runs on this runtime: if the event loop stalls, it stops.
/// It also publishes which Redis nodes the worker is connected to.
fn spawn_heartbeat(state: &State, every: Duration) {
    let beat = state.host.clone();
    let described = state.store.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        let mut last = String::new();
        loop {
            t.tick().await;
            beat.heartbeat();
            let now = described.describe();
            if now != last {
                beat.set_redis_info(&now);
                last = now;
            }
        }
    });
}

/// Accepts and serves connections until a stop signal, within
/// `http.max_connections` and the per-client cap. Consumes the listener,
/// so that it is closed when this returns.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    protocols: Arc<crate::connection::Protocols>,
    state: &Arc<State>,
    mut stop_rx: watch::Receiver<Option<Stop>>,
) -> Option<Stop> {
    let settings = &state.settings;
    let host = &state.host;
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let per_client = crate::client::PerClient::new(settings.max_connections_per_client);
    let mut accept_pause = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop_rx.changed() => return *stop_rx.borrow(),
            p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop_rx.changed() => return *stop_rx.borrow(),
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE, ENOBUFS and friends pass; back off and retry
                    // rather than end the worker.
                    log::warn!("accept failed: {e}; retrying in {accept_pause:?}");
                    sleep(accept_pause).await;
                    accept_pause = (accept_pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        accept_pause = Duration::from_millis(10);
        // One client may not hold every place; a trusted proxy speaks for
        // many clients, so it is not capped.
        let slot = if (settings.trusted_proxy)(peer.ip()) {
            None
        } else {
            match per_client.enter(peer.ip()) {
                Some(s) => Some(s),
                None => {
                    host.count(crate::metrics::CONNECTIONS_REFUSED, 1);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let open = crate::connection::Open::new(state.clone());
        let watcher = state.conns.watcher();
        let protocols = protocols.clone();
        let st = state.clone();
        tokio::spawn(async move {
            protocols.serve(stream, peer, st, watcher).await;
            drop(open);
            drop(slot);
            drop(permit);
        });
    }
}

/// Lets open connections finish, up to `shutdown_timeout`; a fast stop
/// drops them.
async fn drain(conns: &crate::conns::Conns, stop: Option<Stop>, shutdown_timeout: Duration) {
    if stop == Some(Stop::Fast) {
        log::info!("fast stop: {} connection(s) dropped", conns.count());
        return;
    }
    let deadline = Instant::now() + shutdown_timeout;
    let open = conns.count();
    if open > 0 {
        log::info!("draining {open} connection(s)");
        let linger_end = Instant::now() + LINGER.min(shutdown_timeout);
        while conns.count() > 0 && Instant::now() < linger_end {
            sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::select! {
        () = conns.shutdown() => log::info!("drained; exiting"),
        _ = tokio::time::sleep_until(deadline) => {
            log::warn!("shutdown_timeout reached; exiting with connections still open");
        }
    }
}

fn watch_signals(stop: watch::Sender<Option<Stop>>, state: Arc<State>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    // The supervisor's own signals, when sent to the whole process group
    // (kill -HUP -PGID, systemctl kill), must not end or stop a worker.
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
    let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { stop.send_replace(Some(Stop::Graceful)); }
                _ = int.recv() => { stop.send_replace(Some(Stop::Graceful)); }
                _ = quit.recv() => { stop.send_replace(Some(Stop::Fast)); }
                _ = usr1.recv() => {
                    state.host.reopen_log();
                    if let Some(a) = &state.access {
                        a.reopen();
                    }
                }
                _ = hup.recv() => log::debug!("SIGHUP is for the supervisor; ignored"),
                _ = usr2.recv() => log::debug!("SIGUSR2 is for the supervisor; ignored"),
                _ = ttin.recv() => log::debug!("SIGTTIN is for the supervisor; ignored"),
                _ = ttou.recv() => log::debug!("SIGTTOU is for the supervisor; ignored"),
            }
        }
    });
    Ok(())
}
