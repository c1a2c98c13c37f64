//! The client: built without connecting, connected by its own retry loop,
//! reconnected by fred; what it is connected to, for `forkd status`.

use std::time::Duration;

use fred::prelude::*;

use crate::{Result, Store, StoreConfig, StoreError};

/// The cap of the reconnect backoff on Redis Cluster, whatever
/// `redis.reconnect_max_delay` says.
const CLUSTER_RECONNECT_MAX_MS: u32 = 250;

impl Store {
    /// Builds the client without connecting.
    ///
    /// # Errors
    /// [`StoreError::Config`] for a URL fred does not accept.
    pub fn new(cfg: &StoreConfig) -> Result<Store> {
        let mut config =
            Config::from_url(&cfg.url).map_err(|e| StoreError::Config(e.details().to_string()))?;
        // The first connection is made by `start`'s own retry loop (with
        // fail_fast off, fred would wait out a reconnect delay before even
        // its first try); the reconnect policy covers later disconnections.
        config.fail_fast = true;
        if let Some(p) = &cfg.password {
            config.password = Some(p.clone());
        }
        let mut max = cfg.reconnect_max_delay.as_millis().clamp(50, 60_000) as u32;
        // On Redis Cluster a lost node is most often a failover, over as
        // soon as a replica takes over: the next try, which reads the map
        // of the slots anew, should not be a second away.
        if config.server.is_clustered() {
            max = max.min(CLUSTER_RECONNECT_MAX_MS);
        }
        let mut policy = ReconnectPolicy::new_exponential(0, 50, max, 2);
        policy.set_jitter(max / 10 + 10);
        let timeout = cfg.command_timeout;
        let connect = cfg.connect_timeout;
        let client = Builder::from_config(config)
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .with_connection_config(|c| {
                c.connection_timeout = connect;
                c.internal_command_timeout = connect;
                c.max_command_attempts = 2;
            })
            .set_policy(policy)
            .build()
            .map_err(|e| StoreError::Config(e.details().to_string()))?;
        let url_kind = if cfg.url.starts_with("redis+unix") || cfg.url.starts_with("unix") {
            "unix"
        } else if cfg.url.starts_with("rediss") {
            "tls"
        } else {
            "tcp"
        };
        let clustered = client.client_config().server.is_clustered();
        let near = (cfg.near_cache_bytes > 0).then(|| {
            std::sync::Arc::new(crate::near::Near::new(
                cfg.near_cache_bytes,
                cfg.near_cache_max_age,
            ))
        });
        Ok(Store {
            clustered,
            near,
            near_readers: Default::default(),
            client,
            prefix: cfg.prefix.clone(),
            url_kind,
            max_delay: Duration::from_millis(u64::from(max)),
        })
    }

    /// Connects in the background: at once, then, while Redis is not
    /// there, again with exponential backoff (50 ms up to
    /// `reconnect_max_delay`) and jitter; fred's reconnect policy takes over
    /// once connected. Must run inside a tokio runtime; returns at once.
    pub fn start(&self) {
        let client = self.client.clone();
        let max = self.max_delay;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                match client.init().await {
                    Ok(_connection_task) => return,
                    Err(e) => log::debug!("redis: {e}; retrying in {delay:?}"),
                }
                // Jitter from the clock's low bits: up to a fifth more.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::from(d.subsec_nanos()));
                let jitter = Duration::from_millis(nanos % (delay.as_millis() as u64 / 5 + 1));
                tokio::time::sleep(delay + jitter).await;
                delay = (delay * 2).min(max);
            }
        });
    }

    /// Starts the connection and waits up to `timeout` for it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis did not answer in time.
    pub async fn connect_within(&self, timeout: Duration) -> Result<()> {
        self.start();
        self.wait_connected(timeout).await
    }

    /// Waits up to `timeout` for the (already started) connection.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis did not answer in time.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        // A failed attempt (a socket not there yet) is followed by the next
        // reconnection; keep waiting for one until the deadline.
        while !self.client.is_connected() {
            match tokio::time::timeout_at(deadline, self.client.wait_for_connect()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = Some(e),
                Err(_) => break,
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match last {
            _ if self.client.is_connected() => Ok(()),
            Some(e) => Err(e.into()),
            None => Err(StoreError::Unavailable(format!(
                "no connection within {timeout:?}"
            ))),
        }
    }

    /// One line for `forkd status`: the mode and the nodes connected now.
    pub fn describe(&self) -> String {
        let server = &self.client.client_config().server;
        let mode = if server.is_clustered() {
            "cluster"
        } else if server.is_sentinel() {
            "sentinel"
        } else {
            "standalone"
        };
        let mut nodes: Vec<String> = self
            .client
            .active_connections()
            .iter()
            .map(|s| s.to_string())
            .collect();
        nodes.sort();
        let near = match self.near_size() {
            Some((entries, bytes)) if self.near_live() => {
                let ping = self.near_ping().map_or(String::new(), |d| {
                    format!("; ping {:.1} ms", d.as_secs_f64() * 1000.0)
                });
                format!(
                    "; near cache: {entries} held, {} KiB{ping}",
                    bytes.div_ceil(1024)
                )
            }
            Some(_) => "; near cache: not tracking".into(),
            None => String::new(),
        };
        if nodes.is_empty() {
            format!("{mode} ({}), not connected{near}", self.url_kind)
        } else {
            format!("{mode} ({}): {}{near}", self.url_kind, nodes.join(","))
        }
    }

    /// Fails at once, without queueing a command, while disconnected.
    pub(crate) fn ready(&self) -> Result<()> {
        if self.client.is_connected() {
            Ok(())
        } else {
            Err(StoreError::Unavailable("not connected".into()))
        }
    }

    /// One PING.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn ping(&self) -> Result<()> {
        self.ready()?;
        let _: String = self.client.ping(None).await?;
        Ok(())
    }
}
