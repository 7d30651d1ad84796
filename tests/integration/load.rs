//! Continuous HTTP load on loopback that counts every failed request. Bounded: it stops when told
//! to, or after `MAX_RUN` whatever happens.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{http_get, served_by};

const MAX_RUN: Duration = Duration::from_secs(120);

#[derive(Default, Debug)]
pub struct Tally {
    pub ok: usize,
    pub failed: usize,
    pub errors: Vec<String>,
    pub pids: BTreeSet<i32>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each sending `GET path` on a new connection per request.
    pub fn start(addr: SocketAddr, clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                        let result = http_get(addr, path);
                        let mut t = tally.lock().unwrap();
                        match result {
                            Ok((200, body)) => {
                                t.ok += 1;
                                t.pids.insert(served_by(&body));
                            }
                            Ok((status, body)) => {
                                t.failed += 1;
                                t.errors.push(format!("status {status}: {body}"));
                            }
                            Err(e) => {
                                t.failed += 1;
                                t.errors.push(e);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    pub fn ok(&self) -> usize {
        self.tally.lock().unwrap().ok
    }

    /// Waits until `n` more requests succeeded, so every phase of a test really carries load.
    pub fn wait_more(&self, n: usize, timeout: Duration) {
        let target = self.ok() + n;
        crate::harness::wait_for("requests under load", timeout, || {
            (self.ok() >= target).then_some(())
        });
    }

    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.tally).unwrap().into_inner().unwrap()
    }
}
