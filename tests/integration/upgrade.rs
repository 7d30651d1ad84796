//! The grace binary on disk is what a restart runs: an upgrade takes over, a broken one is refused.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::{
    Grace, example, grace_bin, http_get, install, install_copy, served_by, temp_dir,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(20);

fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .display()
        .to_string()
}

/// grace started from a private copy of the binary, so the test can replace it.
fn start_copy(tag: &str) -> (Grace, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let copy = dir.join("grace");
    install_copy(&grace_bin(), &copy);
    let server = example("fault_server");
    let grace = Grace::start_raw(
        copy.to_str().unwrap(),
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            server.to_str().unwrap(),
        ],
    )
    .owning(dir);
    grace.wait_line(") is serving", T);
    (grace, copy)
}

#[test]
fn a_replaced_binary_takes_over_at_the_next_restart() {
    let (grace, copy) = start_copy("upgrade");
    // Install a new build the way package managers do: a new file renamed over the old one.
    let staged = copy.with_extension("new");
    install_copy(&grace_bin(), &staged);
    std::fs::rename(&staged, &copy).unwrap();
    assert!(
        exe_of(grace.pid()).ends_with("(deleted)"),
        "still running the old file"
    );
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    assert_eq!(
        exe_of(grace.pid()),
        copy.display().to_string(),
        "the new file runs, same pid"
    );
}

#[test]
fn a_deleted_or_broken_binary_is_refused_and_the_old_generation_keeps_serving() {
    let (grace, copy) = start_copy("broken-binary");
    let addr = grace.addr();
    let old = served_by(&http_get(addr, "/").unwrap().1);
    let load = Load::start(addr, 2, "/");
    load.wait_more(20, T);

    std::fs::remove_file(&copy).unwrap();
    grace.signal("USR2");
    grace.wait_line_count("restart failed", 1, T);

    install(&copy, b"not a program");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    grace.signal("USR2");
    grace.wait_line_count("restart failed", 2, T);

    // An executable that does not speak the handoff protocol.
    install(&copy, b"#!/bin/sh\necho 99\n");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    grace.signal("USR2");
    let line = grace.wait_line_count("restart failed", 3, T);
    assert!(line.contains("cannot adopt handoff version"), "{line}");

    load.wait_more(20, T);
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert_eq!(tally.pids.iter().copied().collect::<Vec<_>>(), [old]);
    assert_eq!(grace.count_lines(") is serving"), 1);
}

#[test]
fn a_new_binary_that_refuses_the_command_line_or_hangs_is_refused() {
    let (grace, copy) = start_copy("picky-binary");
    let old = grace.serving_pids()[0];
    // Replaced, not overwritten: the running grace still executes the old file.
    std::fs::remove_file(&copy).unwrap();
    install(
        &copy,
        b"#!/bin/sh\necho \"error: unexpected argument '--listen' found\" >&2\nexit 2\n",
    );
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    grace.signal("USR2");
    let line = grace.wait_line("restart failed", T);
    assert!(
        line.contains("refuses this command line: error: unexpected argument"),
        "{line}"
    );

    install(&copy, b"#!/bin/sh\nexec sleep 100\n");
    grace.signal("USR2");
    let line = grace.wait_line_count("restart failed", 2, T);
    assert!(line.contains("did not answer the handoff check"), "{line}");
    assert_eq!(served_by(&http_get(grace.addr(), "/").unwrap().1), old);
}
