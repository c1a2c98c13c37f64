//! The rolling replacement of a reload (and an upgrade): one slot at a
//! time, each new worker ready before the old one drains.

use std::collections::VecDeque;

use super::{Action, Leaving, Phase, Plan, ReloadOutcome, Sig};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Reload {
    pub(super) generation: u64,
    pub(super) pending: VecDeque<usize>,
    /// The slot being replaced now and the deadline of its new worker.
    pub(super) current: Option<(usize, u64)>,
    pub(super) replaced: Vec<(usize, i32, i32)>,
    /// Another reload was asked for while this one ran.
    pub(super) again: bool,
}

impl Plan {
    /// Starts a rolling replacement with a new generation. The caller has
    /// already loaded the new config successfully.
    pub fn begin_reload(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase != Phase::Running {
            return out;
        }
        if let Some(r) = &mut self.reload {
            r.again = true;
            return out;
        }
        // The reload replaces every worker anyway; a recycle's successor
        // not yet ready goes.
        if let Some(r) = self.recycle.take() {
            self.retire_pid(r.new_pid, now, &mut out);
        }
        self.generation += 1;
        self.reload = Some(Reload {
            generation: self.generation,
            pending: (0..self.target).collect(),
            current: None,
            replaced: Vec::new(),
            again: false,
        });
        self.step_reload(now, &mut out);
        out
    }

    pub(super) fn is_reload_candidate(&self, slot: usize, generation: u64) -> bool {
        self.reload.as_ref().is_some_and(|r| {
            r.generation == generation && r.current.is_some_and(|(s, _)| s == slot)
        })
    }

    pub(super) fn fail_reload(&mut self, error: String, out: &mut Vec<Action>) {
        let Some(r) = self.reload.take() else { return };
        log::error!("reload to generation {} abandoned: {error}", r.generation);
        // The new worker, if still alive, goes; the old ones keep serving.
        for w in &mut self.workers {
            if w.generation == r.generation && w.leaving.is_none() {
                if let Some((slot, _)) = r.current {
                    if w.slot == slot {
                        w.leaving = Some(Leaving::Retired);
                        out.push(Action::Signal {
                            pid: w.pid,
                            sig: Sig::Kill,
                        });
                    }
                }
            }
        }
        out.push(Action::ReloadDone(ReloadOutcome {
            workers: None,
            ok: false,
            generation: r.generation,
            replaced: r.replaced,
            error: Some(error),
        }));
    }

    pub(super) fn step_reload(&mut self, now: u64, out: &mut Vec<Action>) {
        loop {
            let Some(r) = &mut self.reload else { return };
            let generation = r.generation;
            if let Some((slot, deadline)) = r.current {
                let incoming = self
                    .workers
                    .iter()
                    .find(|w| w.slot == slot && w.generation == generation && w.leaving.is_none());
                match incoming {
                    Some(new) if new.ready_ms.is_some() => {
                        let new_pid = new.pid;
                        let drain = self.drain_deadline(now);
                        let mut old_pids = Vec::new();
                        if let Some(s) = self.slots.get_mut(slot) {
                            s.last_replaced = Some("reload".into());
                        }
                        for w in &mut self.workers {
                            if w.slot == slot && w.generation < generation && w.leaving.is_none() {
                                w.leaving = Some(Leaving::Retired);
                                w.kill_at_ms = Some(drain);
                                old_pids.push(w.pid);
                                out.push(Action::Signal {
                                    pid: w.pid,
                                    sig: Sig::Term,
                                });
                            }
                        }
                        let r = self.reload.as_mut().expect("reload is running");
                        for old in old_pids {
                            r.replaced.push((slot, old, new_pid));
                        }
                        r.current = None;
                    }
                    Some(_) if now >= deadline => {
                        let ms = self.limits.startup_timeout_ms;
                        self.fail_reload(
                            format!("the new worker for slot {slot} was not ready within {ms} ms"),
                            out,
                        );
                        return;
                    }
                    Some(_) => return,
                    None => {
                        // Spawn not yet reported, or failed and already handled.
                        return;
                    }
                }
            }
            let r = self.reload.as_mut().expect("reload is running");
            match r.pending.pop_front() {
                Some(slot) => {
                    let current_gen = self
                        .workers
                        .iter()
                        .filter(|w| w.slot == slot && w.leaving.is_none())
                        .map(|w| w.generation)
                        .max();
                    match current_gen {
                        // Already of the new generation (respawned after the
                        // reload began), or in backoff: nothing to replace.
                        Some(g) if g >= generation => continue,
                        None => continue,
                        Some(_) => {
                            r.current = Some((slot, now + self.limits.startup_timeout_ms));
                            out.push(Action::Spawn { slot, generation });
                            return;
                        }
                    }
                }
                None => {
                    let r = self.reload.take().expect("reload is running");
                    log::info!(
                        "reload to generation {} done: {} worker(s) replaced",
                        r.generation,
                        r.replaced.len()
                    );
                    out.push(Action::ReloadDone(ReloadOutcome {
                        workers: None,
                        ok: true,
                        generation: r.generation,
                        replaced: r.replaced,
                        error: None,
                    }));
                    if r.again {
                        out.extend(self.begin_reload(now));
                    }
                    return;
                }
            }
        }
    }
}
