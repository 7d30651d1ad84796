//! Restarts under load with the example server: zero failed requests.

use std::time::Duration;

use crate::harness::{Grace, alive, http_get, served_by, served_by_other, wait_for};
use crate::load::Load;

const T: Duration = Duration::from_secs(20);

/// The pids of the generations that grace reported as serving, in order.

#[test]
fn five_restarts_under_load_lose_no_request() {
    let grace = Grace::serve(&[]);
    let addr = grace.addr();
    grace.wait_line("is serving", T);
    let load = Load::start(addr, 4, "/");
    load.wait_more(100, T);
    for i in 1..=5 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", i + 1, T);
        load.wait_more(100, T);
    }
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "failed requests: {:?}\n{}",
        &tally.errors[..tally.errors.len().min(10)],
        grace.describe()
    );

    let pids = grace.serving_pids();
    assert_eq!(pids.len(), 6, "{}", grace.describe());
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        6,
        "every generation is a new process: {pids:?}"
    );
    assert!(
        tally.pids.len() >= 2,
        "requests were served by several generations: {:?}",
        tally.pids
    );
    assert_eq!(grace.count_lines("re-executing"), 5);
    assert!(alive(grace.pid()), "grace keeps its pid across re-exec");

    // Old generations drained and were reaped: only the newest is left, and no zombie.
    let newest = *pids.last().unwrap();
    wait_for("old generations to be reaped", T, || {
        (grace.children() == [newest]).then_some(())
    });
    for old in &pids[..5] {
        assert!(!alive(*old), "old generation {old} still running");
    }
    let (status, body) = http_get(addr, "/").unwrap();
    assert_eq!((status, served_by(&body)), (200, newest));
}

#[test]
fn a_slow_request_finishes_on_the_old_generation() {
    let grace = Grace::serve(&[]);
    let addr = grace.addr();
    grace.wait_line("is serving", T);
    let old = served_by(&http_get(addr, "/").unwrap().1);
    let slow = std::thread::spawn(move || http_get(addr, "/sleep?duration=2s"));
    // The slow request must be in flight on the old generation before the restart.
    std::thread::sleep(Duration::from_millis(300));
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    // New requests go to the new generation.
    served_by_other(addr, old);
    let (status, body) = slow.join().unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        served_by(&body),
        old,
        "the slow request finished on the old generation: {body}"
    );
}
