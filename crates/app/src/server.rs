//! The worker's runtime, accept loop and graceful drain.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, Instant};

use crate::access::AccessLog;
use crate::connection::balance::{Balance, GIVE_WAY, GIVE_WAY_TRIES};
use crate::state::State;
use crate::{ListenerSettings, Worker};

/// After SIGTERM, how long kept-alive connections may send one more
/// request (answered with `Connection: close`) before idle ones are closed.
/// Closing an idle connection at once races with a client that is just
/// sending on it; this window makes that race practically vanish.
const LINGER: Duration = Duration::from_secs(1);

/// Ordered: a fast stop outranks a graceful one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
        listeners,
        shared_listeners,
        settings,
        host,
    } = w;
    let Some(listeners) = listeners_of(listeners, &settings.listeners) else {
        return 1;
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
    state.routes.spawn_health_checks();
    if settings
        .routes
        .iter()
        .any(|r| r.policies.iter().any(|p| p.policy.lease > 1))
        || settings.profile.limit.lease > 1
    {
        spawn_lease_ends(state.clone());
    }
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
    let stop = accept_all(listeners, shared_listeners, protocols, &state, stop_rx).await;
    // The listeners are closed: queued connections go to the other workers.
    state.draining.store(true, Relaxed);
    host.draining();
    drain(&state.conns, stop, settings.shutdown_timeout).await;
    // What this worker's leases did not spend goes back.
    crate::gate::limiter::end_leases(&state, true).await;
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
    store.start_near(cfg);
    // Give Redis a moment before taking requests, so that a new worker of a
    // rolling reload serves from its first request; if Redis is down, serve
    // anyway (503 for what needs it) and connect when it appears.
    if let Err(e) = store.wait_connected(cfg.connect_timeout).await {
        log::warn!("starting without Redis: {e}");
    }
    Some(store)
}

/// Gives back, four times a second, what ended leases did not spend.
fn spawn_lease_ends(state: Arc<State>) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(250));
        loop {
            t.tick().await;
            crate::gate::limiter::end_leases(&state, false).await;
        }
    });
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
            if let Some(n) = described.near_counts() {
                crate::metrics::count_near(beat.as_ref(), &n);
            }
            let now = described.describe();
            if now != last {
                beat.set_redis_info(&now);
                last = now;
            }
        }
    });
}

/// A listening socket watched for readiness, so that a connection can be
/// left to another worker before any is taken (see `balance`).
type Listener = AsyncFd<std::net::TcpListener>;

/// The inherited sockets, each with how it speaks.
fn listeners_of(
    listeners: Vec<std::net::TcpListener>,
    how: &[ListenerSettings],
) -> Option<Vec<(Listener, ListenerSettings)>> {
    if listeners.len() != how.len() {
        log::error!(
            "{} listening socket(s) for {} configured listener(s)",
            listeners.len(),
            how.len()
        );
        return None;
    }
    let mut out = Vec::with_capacity(how.len());
    for (l, how) in listeners.into_iter().zip(how) {
        // tokio 1.54 deprecates this constructor because a type could report
        // a descriptor it does not own; a TcpListener owns its own and
        // reports it for its whole life, which is all the replacement
        // (`register_with_interest`, which this crate may not call) asks.
        #[allow(deprecated)]
        let registered = l
            .set_nonblocking(true)
            .and_then(|()| AsyncFd::with_interest(l, tokio::io::Interest::READABLE));
        match registered {
            Ok(l) => out.push((l, *how)),
            Err(e) => {
                log::error!("cannot use a listening socket: {e}");
                return None;
            }
        }
    }
    Some(out)
}

/// One accept loop per listener, sharing the connection limits; returns
/// once every loop has seen the stop.
async fn accept_all(
    listeners: Vec<(Listener, ListenerSettings)>,
    shared: bool,
    protocols: Arc<crate::connection::Protocols>,
    state: &Arc<State>,
    stop_rx: watch::Receiver<Option<Stop>>,
) -> Option<Stop> {
    let limits = Limits {
        total: Arc::new(Semaphore::new(state.settings.max_connections)),
        per_client: crate::request::client::PerClient::new(
            state.settings.max_connections_per_client,
        ),
        balance: shared.then(|| Arc::new(Mutex::new(Balance::new()))),
    };
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|(listener, how)| {
            tokio::spawn(accept_loop(
                listener,
                how,
                protocols.clone(),
                state.clone(),
                limits.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let mut stop = None;
    for l in loops {
        if let Ok(s) = l.await {
            stop = stop.max(s);
        }
    }
    stop
}

/// The connection limits every listener of a worker shares.
#[derive(Clone)]
struct Limits {
    total: Arc<Semaphore>,
    per_client: Arc<crate::request::client::PerClient>,
    /// On shared listeners, the accepts of every loop of this worker (see
    /// `balance`).
    balance: Option<Arc<Mutex<Balance>>>,
}

fn lock(b: &Mutex<Balance>) -> std::sync::MutexGuard<'_, Balance> {
    b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts and serves connections until a stop signal, within
/// `http.max_connections` and the per-client cap. Consumes the listener,
/// so that it is closed when this returns. A PROXY protocol listener
/// takes connections from trusted proxies only.
async fn accept_loop(
    listener: Listener,
    how: ListenerSettings,
    protocols: Arc<crate::connection::Protocols>,
    state: Arc<State>,
    limits: Limits,
    mut stop_rx: watch::Receiver<Option<Stop>>,
) -> Option<Stop> {
    let settings = &state.settings;
    let host = &state.host;
    let Limits {
        total: limit,
        per_client,
        balance,
    } = limits;
    let mut accept_pause = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop_rx.changed() => return *stop_rx.borrow(),
            p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        // Once a connection is queued: on a shared listener, a worker over
        // its share leaves it to another for a moment.
        let queued = tokio::select! {
            biased;
            _ = stop_rx.changed() => return *stop_rx.borrow(),
            r = listener.readable() => r,
        };
        let accepted = match queued {
            Err(e) => Err(e),
            Ok(mut queued) => {
                if let Some(b) = &balance {
                    for _ in 0..GIVE_WAY_TRIES {
                        if !lock(b).give_way(&state) {
                            break;
                        }
                        tokio::select! {
                            biased;
                            _ = stop_rx.changed() => return *stop_rx.borrow(),
                            () = sleep(GIVE_WAY) => {}
                        }
                    }
                }
                match queued.try_io(|l| l.get_ref().accept()) {
                    // Another worker took it.
                    Err(_would_block) => continue,
                    Ok(r) => r.and_then(|(s, peer)| {
                        s.set_nonblocking(true)?;
                        Ok((tokio::net::TcpStream::from_std(s)?, peer))
                    }),
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE, ENOBUFS and friends pass; back off and retry
                // rather than end the worker.
                log::warn!("accept failed: {e}; retrying in {accept_pause:?}");
                sleep(accept_pause).await;
                accept_pause = (accept_pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        accept_pause = Duration::from_millis(10);
        if let Some(b) = &balance {
            lock(b).accepted();
        }
        let trusted = (settings.trusted_proxy)(peer.ip());
        if how.proxy_protocol && !trusted {
            // Its header would name any address it liked.
            host.count(crate::metrics::PROXY_HEADERS_REFUSED, 1);
            log::debug!("PROXY protocol listener: refused {peer}, not a trusted proxy");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let open = crate::state::Open::new(state.clone());
        let watcher = state.conns.watcher();
        let protocols = protocols.clone();
        let st = state.clone();
        let caps = per_client.clone();
        tokio::spawn(async move {
            protocols.serve(stream, peer, st, watcher, how, &caps).await;
            drop(open);
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
