//! A bounded request loop in the background, on new and kept-alive
//! connections, counting what failed.

use super::*;

/// What a load loop saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub pids: HashSet<i32>,
}

/// A continuous request loop on several threads: half on new connections,
/// half on kept-alive ones. Bounded: it stops by itself after `max` time.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadResult>>,
}

impl Load {
    pub fn start(port: u16, threads: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Duration::from_secs(120);
        let threads = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut res = LoadResult::default();
                    let mut ka = KeepAlive::new(port);
                    let started = Instant::now();
                    for _ in 0..2_000_000u64 {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > max {
                            break;
                        }
                        let r = if i % 2 == 0 {
                            get(port, path)
                        } else {
                            ka.get(path)
                        };
                        match r {
                            Ok(r) if r.status == 200 => {
                                res.ok += 1;
                                res.pids.insert(r.pid());
                            }
                            Ok(r) => {
                                res.failed += 1;
                                res.errors.push(format!("status {}", r.status));
                            }
                            Err(e) => {
                                res.failed += 1;
                                res.errors.push(e.to_string());
                            }
                        }
                    }
                    res
                })
            })
            .collect();
        Load { stop, threads }
    }

    pub fn finish(mut self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadResult::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap();
            total.ok += r.ok;
            total.failed += r.failed;
            total.errors.extend(r.errors);
            total.pids.extend(r.pids);
        }
        total
    }
}

impl Drop for Load {
    /// A test that panics mid-load stops its load threads rather than let
    /// them hammer a dead port for two minutes.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}
