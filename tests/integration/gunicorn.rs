//! gunicorn (Debian's package), a server no one here wrote, through restarts under load: it only
//! works if LISTEN_PID and the fd layout are exactly what systemd would give.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{Grace, http_get, served_by, wait_for};
use crate::load::Load;

const T: Duration = Duration::from_secs(30);

fn gunicorn() -> &'static str {
    let path = "/usr/bin/gunicorn";
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: install Debian's gunicorn package (.ci/run does)"
    );
    path
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn restarts_under_load(extra: &[&str]) {
    let fixtures = fixtures();
    let mut args = vec!["run", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    args.extend([
        "--",
        gunicorn(),
        "--workers",
        "2",
        "--graceful-timeout",
        "10",
        "--log-level",
        "warning",
        "--chdir",
        fixtures.to_str().unwrap(),
        "wsgi_app:app",
    ]);
    let grace = Grace::start(&args);
    let addr = grace.addr();
    grace.wait_line(") is serving", T);
    // gunicorn's arbiter says READY=1 before its workers run: wait until one answers.
    wait_for("a gunicorn worker", T, || http_get(addr, "/").ok());
    let load = Load::start(addr, 4, "/");
    load.wait_more(50, T);
    for i in 1..=3 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", i + 1, T);
        load.wait_more(50, T);
    }
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}\n{}",
        &tally.errors[..tally.errors.len().min(10)],
        grace.describe()
    );
    let masters = grace.serving_pids();
    assert_eq!(masters.len(), 4);
    // The old arbiters drained and were reaped; the last one's workers answer.
    let last = *masters.last().unwrap();
    wait_for("old gunicorn masters to exit", T, || {
        (grace.children() == [last]).then_some(())
    });
    let worker = served_by(&http_get(addr, "/").unwrap().1);
    assert!(
        crate::harness::children_of(last).contains(&worker),
        "served by a worker of the newest master"
    );
}

#[test]
fn gunicorn_restarts_under_load_lose_no_request() {
    restarts_under_load(&[]);
}

#[test]
fn gunicorn_with_an_http_probe_on_its_private_socket() {
    restarts_under_load(&["--ready", "http:/"]);
}
