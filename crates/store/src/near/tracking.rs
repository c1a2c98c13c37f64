//! The near cache's connections: a listener and a reader on each primary,
//! made again after any loss, and which reader reads which key.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::client::Invalidation;
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Config, Server, ServerConfig};
use fred::types::Value as FredValue;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use tokio::sync::Notify;

use super::{failpoint, Near};
use crate::{Store, StoreConfig};

/// With the failpoint `near-slow-listener`, the invalidation channel holds
/// 2 messages and the near cache reads one a second, so that a test can
/// make it lag.
const SLOW_LISTENER: &str = "near-slow-listener";

/// The readers of one life of the near cache's connections, and which
/// reads which key.
pub(crate) struct Readers {
    /// Redis Cluster: the slots as they were when the pairs were made
    /// (None: one primary, which reads every key).
    routing: Option<ClusterRouting>,
    /// Each primary's reader, in the order of `routing`'s primaries.
    readers: Vec<(Option<Server>, Client)>,
    /// Told by a fill that a node answered `MOVED` or `ASK`: the slots
    /// have moved, and the pairs are made again.
    moved: Notify,
}

impl Readers {
    pub(super) fn for_key(&self, key: &str) -> Option<Client> {
        let Some(routing) = &self.routing else {
            return self.readers.first().map(|(_, c)| c.clone());
        };
        let owner = routing.get_server(ClusterRouting::hash_key(key.as_bytes()))?;
        self.readers
            .iter()
            .find(|(s, _)| s.as_ref() == Some(owner))
            .map(|(_, c)| c.clone())
    }

    /// A fill's read failed: when because the slot is no longer where the
    /// map said (MOVED), the pairs are made again. ASK (a slot migrating)
    /// lasts the whole migration: the fill is just not kept.
    pub(super) fn read_failed(&self, e: &Error) {
        log::debug!("near cache: a fill's read failed: {e}");
        if *e.kind() == ErrorKind::Cluster && e.details().starts_with("MOVED") {
            self.moved.notify_one();
        }
    }
}

/// The configs of the primaries to track: the one of the URL (standalone,
/// or found through Sentinel), or every primary in the command client's
/// map of the slots, asked of the cluster now, with that map.
async fn primaries(
    store: &Store,
    cfg: &StoreConfig,
) -> Result<(Option<ClusterRouting>, Vec<(Option<Server>, Config)>), Error> {
    if !store.clustered {
        let mut config = Config::from_url(&cfg.url)?;
        if let Some(p) = &cfg.password {
            config.password = Some(p.clone());
        }
        return Ok((None, vec![(None, config)]));
    }
    // A map kept from before would miss a primary that took over without
    // a connection lost (CLUSTER FAILOVER).
    tokio::time::timeout(cfg.command_timeout, store.client.sync_cluster())
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "no map of the slots in time"))??;
    let routing = store
        .client
        .cached_cluster_state()
        .filter(|r| r.len() > 0)
        .ok_or_else(|| Error::new(ErrorKind::Cluster, "no map of the slots yet"))?;
    let configs = routing
        .unique_primary_nodes()
        .into_iter()
        .map(|server| {
            // The command client's TLS, user and password; one node.
            let mut config = store.client.client_config();
            config.server = ServerConfig::Centralized {
                server: server.clone(),
            };
            (Some(server), config)
        })
        .collect();
    Ok((Some(routing), configs))
}

/// A client of its own for the near cache: no reconnection (a lost
/// connection is a flush and new pairs), no retry.
fn own_client(mut config: Config, cfg: &StoreConfig) -> Result<Client, Error> {
    config.fail_fast = true;
    let (timeout, connect) = (cfg.command_timeout, cfg.connect_timeout);
    Builder::from_config(config)
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
            p.broadcast_channel_capacity = if failpoint(SLOW_LISTENER) { 2 } else { 4096 };
        })
        .with_connection_config(|c| {
            c.connection_timeout = connect;
            c.internal_command_timeout = connect;
            c.max_command_attempts = 1;
        })
        .build()
}

/// A listener and a reader, connected to one primary.
struct Pair {
    listener: Client,
    reader: Client,
}

/// What a pair says, listened to from before it connects, so that nothing
/// it says while the other pairs are made is missed.
struct Heard {
    invalidations: Receiver<Invalidation>,
    listener_errors: Receiver<(Error, Option<Server>)>,
    reader_errors: Receiver<(Error, Option<Server>)>,
}

impl Pair {
    /// Connects both and turns tracking on, redirected to the listener.
    async fn connect(config: Config, cfg: &StoreConfig) -> Result<(Pair, Heard), Error> {
        let (listener, reader) = (own_client(config.clone(), cfg)?, own_client(config, cfg)?);
        let heard = Heard {
            invalidations: listener.invalidation_rx(),
            listener_errors: listener.error_rx(),
            reader_errors: reader.error_rx(),
        };
        let pair = Pair { listener, reader };
        let (listener, reader) = (&pair.listener, &pair.reader);
        let made = async {
            let _l = listener.init().await?;
            let _r = reader.init().await?;
            // Named for an operator's CLIENT LIST (and the tests' CLIENT KILL).
            let () = listener.client_setname("forkd-near-listener").await?;
            let () = reader.client_setname("forkd-near-reader").await?;
            let id: i64 = listener.client_id().await?;
            listener.subscribe("__redis__:invalidate").await?;
            reader
                .client_tracking(
                    "on",
                    Some(id),
                    Vec::<String>::new(),
                    false,
                    false,
                    false,
                    false,
                )
                .await
        };
        match made.await {
            Ok(()) => Ok((pair, heard)),
            Err(e) => {
                pair.quit().await;
                Err(e)
            }
        }
    }

    async fn quit(&self) {
        let _ = self.listener.quit().await;
        let _ = self.reader.quit().await;
    }

    /// Whether the pair still does its job: both connected, the listener
    /// answering, Redis still with somewhere to send the reader's
    /// invalidations (a half-open connection says nothing by itself); on
    /// Redis Cluster, the node still a primary (a replica is told nothing
    /// of the writes it copies) in a cluster that is up (a primary cut off
    /// from the others says `cluster_state:fail` once the node timeout
    /// has passed, as its replica takes over). CLUSTER NODES and CLUSTER
    /// INFO, unlike ROLE, are not in the `@dangerous` ACL category.
    async fn check(
        &self,
        cfg: &StoreConfig,
        clustered: bool,
        ping: &mut Duration,
    ) -> Result<bool, Error> {
        if !self.listener.is_connected() || !self.reader.is_connected() {
            return Ok(false);
        }
        let asked = tokio::time::timeout(cfg.command_timeout, async {
            let began = std::time::Instant::now();
            let _: FredValue = self.listener.ping(None).await?;
            *ping = (*ping).max(began.elapsed());
            let p = self.reader.pipeline();
            let () = p.client_trackinginfo().await?;
            if clustered {
                let () = p.cluster_nodes().await?;
                let () = p.cluster_info().await?;
            }
            p.all::<Vec<FredValue>>().await
        });
        Ok(match asked.await {
            Ok(Ok(reply)) => {
                let tracking = reply.first().map(|i| format!("{i:?}")).unwrap_or_default();
                let text = |i: usize| {
                    reply
                        .get(i)
                        .and_then(FredValue::as_string)
                        .unwrap_or_default()
                };
                let primary = !clustered
                    || text(1)
                        .lines()
                        .find(|l| l.contains("myself"))
                        .and_then(|l| l.split(' ').nth(2))
                        .is_some_and(|flags| flags.split(',').any(|f| f == "master"));
                let up = !clustered || text(2).contains("cluster_state:ok");
                !tracking.contains("broken_redirect") && primary && up
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => false,
        })
    }
}

impl Heard {
    /// Applies the listener's invalidations until either connection is
    /// lost (Ok when it simply closed).
    async fn follow(mut self, near: &Near) -> Result<(), Error> {
        let (invalidations, listener_errors, reader_errors) = (
            &mut self.invalidations,
            &mut self.listener_errors,
            &mut self.reader_errors,
        );
        let slow = failpoint(SLOW_LISTENER);
        loop {
            if slow {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tokio::select! {
                m = invalidations.recv() => match m {
                    Ok(inv) if inv.keys.is_empty() => near.flush(true),
                    Ok(inv) => near.invalidate(&inv.keys),
                    // Invalidations were missed: drop everything.
                    Err(RecvError::Lagged(_)) => near.flush(true),
                    Err(RecvError::Closed) => return Ok(()),
                },
                e = listener_errors.recv() => return e.map_or(Ok(()), |(e, _)| Err(e)),
                e = reader_errors.recv() => return e.map_or(Ok(()), |(e, _)| Err(e)),
            }
        }
    }
}

/// One life of the near cache's connections: a pair for each primary
/// made, then invalidations applied until any connection is lost or the
/// primaries change (Ok when they were up).
pub(super) async fn track(store: &Store, near: &Near, cfg: &StoreConfig) -> Result<(), Error> {
    near.ping_us.store(u64::MAX, Relaxed);
    let (routing, configs) = primaries(store, cfg).await?;
    let mut pairs: Vec<Pair> = Vec::with_capacity(configs.len());
    let mut servers = Vec::with_capacity(configs.len());
    let ended = async {
        let mut heard = Vec::with_capacity(configs.len());
        for (server, config) in configs {
            let (pair, h) = Pair::connect(config, cfg).await?;
            pairs.push(pair);
            heard.push(h);
            servers.push(server);
        }
        let readers = Arc::new(Readers {
            routing: routing.clone(),
            readers: servers
                .iter()
                .cloned()
                .zip(pairs.iter().map(|p| p.reader.clone()))
                .collect(),
            moved: Notify::new(),
        });
        if let Ok(mut r) = store.near_readers.lock() {
            *r = Some(readers.clone());
        }
        near.flush(true);
        let followed =
            futures::future::select_all(heard.into_iter().map(|h| Box::pin(h.follow(near))));
        let checked = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let mut ping = Duration::ZERO;
                for pair in &pairs {
                    if !pair.check(cfg, routing.is_some(), &mut ping).await? {
                        return Ok(());
                    }
                }
                near.ping_us.store(ping.as_micros() as u64, Relaxed);
                // Slots moved, or a primary came or went.
                let now = store.client.cached_cluster_state();
                if routing.as_ref().map(|r| r.slots()) != now.as_ref().map(|r| r.slots())
                    && routing.is_some()
                {
                    return Ok(());
                }
            }
        };
        tokio::select! {
            (r, _, _) = followed => r,
            r = checked => r,
            () = readers.moved.notified() => Ok(()),
        }
    };
    let r: Result<(), Error> = ended.await;
    near.flush(false);
    if let Ok(mut r) = store.near_readers.lock() {
        *r = None;
    }
    for pair in &pairs {
        pair.quit().await;
    }
    r
}
