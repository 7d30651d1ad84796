//! The project's own unit files (`examples/systemd/`) run by a real systemd manager: 254 for
//! `Type=notify-reload`, the host's 252 and 254 for the `Type=notify` unit meant for older
//! versions, and the `.socket` + `.service` pair. Each test starts its own user manager, confined to
//! a cgroup and mount namespace of its own (`tests/systemd/manager.sh`, which says why that is
//! the only safe way on a machine whose PID 1 is not systemd), and stops it by PID.
//!
//! The units are the example files with only their paths and port replaced (every replacement
//! must match, so an edited example cannot silently test something else), plus a drop-in that
//! sends the service's output to a file the test reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{
    TempDir, example, free_port, grace_bin, http_get, install, install_copy, served_by, sleeping,
    temp_dir, wait_for,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/systemd/manager.sh")
}

/// One running user manager, stopped (by PID, with its cgroup removed) when dropped.
struct Manager {
    dir: TempDir,
}

impl Manager {
    fn start(version: &str) -> Manager {
        let dir = temp_dir(&format!("systemd-{version}"));
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .arg(version)
            .output()
            .unwrap();
        let manager = Manager { dir };
        assert!(
            out.status.success(),
            "starting systemd {version} (tests/systemd/manager.sh; .ci/deps fetches 254): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shown = manager.ctl(&["--version"]);
        let first = String::from_utf8_lossy(&shown.stdout);
        assert!(
            first.starts_with(&format!("systemd {version} ")),
            "wanted systemd {version}, got {first}"
        );
        manager
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(script())
            .arg("ctl")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    /// `systemctl ARGS`, which must succeed.
    fn ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    fn show(&self, unit: &str, property: &str) -> String {
        let out = self.ctl(&["show", "--value", "-p", property, unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn main_pid(&self, unit: &str) -> i32 {
        self.show(unit, "MainPID").parse().unwrap()
    }

    /// Installs `unit` with `text`, plus a drop-in sending its output to `DIR/UNIT.log`.
    fn install(&self, unit: &str, text: &str) {
        let units = self.dir.join("config/systemd/user");
        std::fs::write(units.join(unit), text).unwrap();
        if unit.ends_with(".service") {
            let dropin = units.join(format!("{unit}.d"));
            std::fs::create_dir_all(&dropin).unwrap();
            std::fs::write(
                dropin.join("test-output.conf"),
                format!(
                    "[Service]\nStandardOutput=append:{}\nStandardError=inherit\n",
                    self.log_of(unit).display()
                ),
            )
            .unwrap();
        }
        self.ok(&["daemon-reload"]);
    }

    fn log_of(&self, unit: &str) -> PathBuf {
        self.dir.join(format!("{unit}.log"))
    }

    /// Everything the services wrote, for failure messages.
    fn log(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                all += &format!("\n--- {}\n", entry.path().display());
                all += &std::fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        all
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}

/// An example unit file with `(from, to)` replaced; each `from` must occur in it.
fn render(file: &str, replacements: &[(&str, String)]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/systemd")
        .join(file);
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in replacements {
        assert!(text.contains(from), "{} has no {from:?}", path.display());
        text = text.replace(from, to);
    }
    text
}

/// What the example units name, put in the test's directory: grace, the server (a copy, so
/// that a release can replace it) and the /run files; and the port, where `port` is given.
fn paths(dir: &Path, port: Option<u16>) -> Vec<(&'static str, String)> {
    let server = dir.join("grace-demo-server");
    if !server.exists() {
        install_copy(&example("server"), &server);
    }
    let mut replace = vec![
        (
            "/usr/local/bin/grace-demo-server",
            server.display().to_string(),
        ),
        (
            "/usr/local/bin/grace ",
            format!("{} ", grace_bin().display()),
        ),
    ];
    if let Some(port) = port {
        replace.push(("--listen :8080", format!("--listen 127.0.0.1:{port}")));
        replace.push(("/run/", format!("{}/", dir.display())));
    }
    replace
}

/// A release that exits at once: grace rolls it back. Renamed over the running one, as a deploy
/// does (writing into a running executable fails).
fn break_release(dir: &Path) {
    let staged = dir.join(".grace-demo-server.new");
    install(&staged, b"#!/bin/sh\nexit 3\n");
    std::fs::rename(&staged, dir.join("grace-demo-server")).unwrap();
}

/// Waits until `addr` is served by the generation systemd's status names, and returns its pid.
fn serving(manager: &Manager, unit: &str, addr: SocketAddr, generation: u64) -> i32 {
    let prefix = format!("serving: generation {generation} (pid ");
    let status = wait_for(&format!("STATUS of generation {generation}"), T, || {
        let status = manager.show(unit, "StatusText");
        status.starts_with(&prefix).then_some(status)
    });
    let pid: i32 = status[prefix.len()..]
        .trim_end_matches(')')
        .parse()
        .unwrap();
    wait_for(&format!("pid {pid} to answer"), T, || {
        (served_by(&http_get(addr, "/").ok()?.1) == pid).then_some(())
    });
    pid
}

/// `systemctl stop` finishes a request in flight, then the unit is inactive with nothing bound.
fn stop_finishes_in_flight(manager: &Manager, unit: &str, addr: SocketAddr, server: i32) {
    let slow = std::thread::spawn(move || http_get(addr, "/sleep?duration=3s"));
    wait_for("the slow request to be in the server", T, || {
        sleeping(server).then_some(())
    });
    assert!(!slow.is_finished(), "still in flight when the stop begins");
    manager.ok(&["stop", unit]);
    let (status, body) = slow.join().unwrap().unwrap();
    assert_eq!((status, served_by(&body)), (200, server), "{body}");
    assert_eq!(manager.show(unit, "ActiveState"), "inactive");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing left bound"
    );
}

/// `Type=notify-reload` (254): start waits for READY=1; reloads under load lose nothing and keep
/// MainPID; a broken release is rolled back (the reload still exits 0: systemd has no way for
/// notify-reload to fail one), STATUS says so while the old generation serves; stop drains.
#[test]
fn notify_reload_unit_on_systemd_254() {
    let manager = Manager::start("254");
    let unit = "grace-demo.service";
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    manager.install(unit, &render(unit, &paths(&manager.dir, Some(port))));
    manager.ok(&["start", unit]);
    // `start` returned after READY=1: it serves now, no polling.
    let (status, body) = http_get(addr, "/").expect("serving once `systemctl start` returned");
    assert_eq!(status, 200);
    let main = manager.main_pid(unit);
    let pid_file = std::fs::read_to_string(manager.dir.join("grace-demo.pid")).unwrap();
    assert_eq!(pid_file.trim(), main.to_string());
    let mut server = serving(&manager, unit, addr, 1);
    assert_eq!(served_by(&body), server);

    let load = Load::start(addr, 4, "/");
    load.wait_more(50, T);
    for generation in 2..=4 {
        manager.ok(&["reload", unit]);
        let next = serving(&manager, unit, addr, generation);
        assert_ne!(next, server);
        server = next;
        assert_eq!(manager.main_pid(unit), main, "MainPID never changes");
        load.wait_more(50, T);
    }

    break_release(&manager.dir);
    manager.ok(&["reload", unit]);
    wait_for("STATUS of the rollback", T, || {
        let status = manager.show(unit, "StatusText");
        status
            .starts_with("restart failed: generation 5")
            .then_some(())
    });
    load.wait_more(50, T);
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), server);
    assert_eq!(manager.main_pid(unit), main);
    assert_eq!(manager.show(unit, "ActiveState"), "active");
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{tally:?}{}", manager.log());

    stop_finishes_in_flight(&manager, unit, addr, server);
}

/// `Type=notify` with `ExecReload=grace restart` under `version`: reloads under load lose
/// nothing, and a rolled-back release fails `systemctl reload`.
fn notify_unit(version: &str) {
    let manager = Manager::start(version);
    let unit = "grace-demo-notify.service";
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    manager.install(unit, &render(unit, &paths(&manager.dir, Some(port))));
    manager.ok(&["start", unit]);
    http_get(addr, "/").expect("serving once `systemctl start` returned");
    let main = manager.main_pid(unit);
    let mut server = serving(&manager, unit, addr, 1);

    let load = Load::start(addr, 4, "/");
    load.wait_more(50, T);
    for generation in 2..=4 {
        manager.ok(&["reload", unit]);
        let next = serving(&manager, unit, addr, generation);
        assert_ne!(next, server);
        server = next;
        assert_eq!(manager.main_pid(unit), main, "MainPID never changes");
        load.wait_more(50, T);
    }

    break_release(&manager.dir);
    let reload = manager.ctl(&["reload", unit]);
    let said = String::from_utf8_lossy(&reload.stderr);
    assert!(!reload.status.success(), "a rolled-back reload fails");
    assert!(said.contains("failed"), "{said}");
    assert_eq!(manager.show(unit, "ReloadResult"), "exit-code");
    // STATUS comes over a socket of its own: systemd may read it after the reload job ended.
    wait_for("STATUS of the rollback", T, || {
        let status = manager.show(unit, "StatusText");
        status
            .starts_with("restart failed: generation 5")
            .then_some(())
    });
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), server);
    assert_eq!(manager.show(unit, "ActiveState"), "active");
    load.wait_more(50, T);
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{tally:?}{}", manager.log());

    stop_finishes_in_flight(&manager, unit, addr, server);
}

#[test]
fn notify_unit_on_systemd_252() {
    notify_unit("252");
}

#[test]
fn notify_unit_on_systemd_254() {
    notify_unit("254");
}

/// The `.socket` + `.service` pair: the first connection starts the service, reloads keep the
/// same grace, and a restart of the service (a new grace) refuses no connection: systemd holds
/// the listening socket throughout.
#[test]
fn socket_unit_keeps_the_port_through_a_service_restart() {
    let manager = Manager::start("254");
    let (socket, service) = ("grace-demo-socket.socket", "grace-demo-socket.service");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    manager.install(
        socket,
        &render(
            socket,
            &[(
                "ListenStream=8080",
                format!("ListenStream=127.0.0.1:{port}"),
            )],
        ),
    );
    manager.install(service, &render(service, &paths(&manager.dir, None)));
    manager.ok(&["start", socket]);
    assert_eq!(manager.show(service, "ActiveState"), "inactive");

    // The first request starts the service (socket activation of grace itself).
    let load = Load::start(addr, 4, "/");
    load.wait_more(50, T);
    let first = manager.main_pid(service);
    let mut server = serving(&manager, service, addr, 1);
    for generation in 2..=3 {
        manager.ok(&["reload", service]);
        let next = serving(&manager, service, addr, generation);
        assert_ne!(next, server);
        server = next;
        assert_eq!(manager.main_pid(service), first);
        load.wait_more(50, T);
    }

    manager.ok(&["restart", service]);
    let second = manager.main_pid(service);
    assert_ne!(second, first, "a new grace");
    serving(&manager, service, addr, 1);
    assert_eq!(manager.show(socket, "ActiveState"), "active");
    load.wait_more(50, T);
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{tally:?}{}", manager.log());
    manager.ok(&["stop", service, socket]);
}
