//! A rolling restart across hosts with an existing tool: `examples/ansible/rollout.yml`, run by
//! ansible-core (which `.ci/deps` installs) against three local "hosts", each a grace with its own
//! port, control socket and installed server, under load.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::harness::{Grace, example, grace_bin, install_copy, temp_dir, wait_for};
use crate::load::{Load, Tally};

/// Where `.ci/deps` installs ansible-core (a venv of its own, pinned).
const ANSIBLE_VENV: &str = "/opt/grace-ci/ansible/bin/ansible-playbook";
const T: Duration = Duration::from_secs(20);
/// ansible-playbook starts slowly and runs every task in new Python processes: 4-10s a run here
/// on a quiet machine, 40s with another test suite running beside it on the 2 cores, and 2
/// minutes with a release build as well.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(180);

/// The venv's ansible-playbook, else one on `PATH`; a clear failure if there is neither.
fn ansible_playbook() -> PathBuf {
    if Path::new(ANSIBLE_VENV).exists() {
        return PathBuf::from(ANSIBLE_VENV);
    }
    which::which("ansible-playbook").unwrap_or_else(|_| {
        panic!("{ANSIBLE_VENV} is missing and no ansible-playbook is on PATH: run .ci/deps")
    })
}

/// One "host": a grace on a port of its own with its own control socket, running the server
/// installed in its own directory.
struct Host {
    name: &'static str,
    dir: PathBuf,
    server: PathBuf,
    control: PathBuf,
    grace: Grace,
    addr: SocketAddr,
}

impl Host {
    fn start(root: &Path, name: &'static str, release: &Path) -> Host {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        let server = dir.join("server");
        install_copy(release, &server);
        let control = dir.join("ctl");
        let grace = Grace::start(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--",
            server.to_str().unwrap(),
        ]);
        grace.wait_line(") is serving", T);
        let addr = grace.addr();
        Host {
            name,
            dir,
            server,
            control,
            grace,
            addr,
        }
    }

    fn inventory_line(&self) -> String {
        format!(
            "{} ansible_connection=local server_path={} grace_control={} grace_bin={}\n",
            self.name,
            self.server.display(),
            self.control.display(),
            grace_bin().display()
        )
    }

    fn status(&self) -> Value {
        let out = Command::new(grace_bin())
            .args(["status", "--json", "--control"])
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(out.status.success(), "grace status of {}", self.name);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The serving generation's pid, as grace reports it.
    fn current_pid(&self) -> i32 {
        self.status()["current"]["pid"].as_i64().unwrap() as i32
    }

    /// The installed file is `release`, and nothing else was left next to it (no backup, no
    /// temporary file).
    fn assert_installed(&self, release: &Path, what: &str) {
        assert!(
            std::fs::read(&self.server).unwrap() == std::fs::read(release).unwrap(),
            "{}: {} is not {what}",
            self.name,
            self.server.display()
        );
        let mut left: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["ctl", "server"], "{}: files left behind", self.name);
    }
}

/// The playbook's outcome: exit code, everything it printed, how long it took.
struct Run {
    code: Option<i32>,
    output: String,
    took: Duration,
}

impl Run {
    /// Where the output first names `host` in a task result (`ok: [web-a]`, `changed: [web-a]`).
    fn first_result(&self, host: &str) -> Option<usize> {
        self.output.find(&format!("[{host}]"))
    }
}

/// Runs `examples/ansible/rollout.yml` on `inventory` with `new_binary`, isolated from the user's
/// ansible configuration and with every file it writes under `dir`.
fn rollout(ansible_playbook: &Path, dir: &Path, inventory: &Path, new_binary: &Path) -> Run {
    let playbook = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/ansible/rollout.yml");
    let ansible = dir.join("ansible");
    std::fs::create_dir_all(&ansible).unwrap();
    // An empty configuration file of ours, so that neither ~/.ansible.cfg nor
    // /etc/ansible/ansible.cfg is read.
    let config = ansible.join("ansible.cfg");
    std::fs::write(&config, "[defaults]\n").unwrap();
    let mut cmd = Command::new(ansible_playbook);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANSIBLE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ANSIBLE_CONFIG", &config)
        .env("ANSIBLE_HOME", ansible.join("home"))
        .env("ANSIBLE_LOCAL_TEMP", ansible.join("local-tmp"))
        // On the hosts' file system, so the copy module renames straight into place.
        .env("ANSIBLE_REMOTE_TEMP", ansible.join("remote-tmp"))
        .env("ANSIBLE_RETRY_FILES_ENABLED", "false")
        .env("ANSIBLE_HOST_KEY_CHECKING", "false")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_NOCOWS", "1")
        // ansible refuses to run under a locale whose encoding is not UTF-8.
        .env("LC_ALL", "C.UTF-8")
        .env_remove("GRACE_TEST_BIN")
        // No ansible.cfg of the working directory either.
        .current_dir(dir)
        .arg("-i")
        .arg(inventory)
        .arg(&playbook)
        .arg("-e")
        .arg(json!({ "new_binary": new_binary }).to_string())
        .stdin(Stdio::null())
        // Its own process group, so a run past its time is stopped with all its workers.
        .process_group(0);
    // stdout and stderr in one pipe, in the order ansible wrote them, each line with the time
    // since the start: where a slow run spent its time.
    let (reader, writer) = std::io::pipe().unwrap();
    cmd.stdout(writer.try_clone().unwrap()).stderr(writer);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let collector = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                let at = started.elapsed().as_secs_f64();
                lines.lock().unwrap().push(format!("{at:6.2}s {line}"));
            }
        })
    };
    let output = |lines: &Mutex<Vec<String>>| lines.lock().unwrap().join("\n");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > PLAYBOOK_TIMEOUT {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "ansible-playbook ran past {PLAYBOOK_TIMEOUT:?}\n{}",
                output(&lines)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    // Its workers are gone with it, and the pipe's last writer with them.
    wait_for("the end of ansible's output", T, || {
        collector.is_finished().then_some(())
    });
    collector.join().unwrap();
    let run = Run {
        code: status.code(),
        output: output(&lines),
        took,
    };
    eprintln!(
        "fleet: ansible-playbook with {} took {:?}",
        new_binary.display(),
        run.took
    );
    run
}

/// Runs `rollout` with a client sending requests to each host from before it starts to after it
/// ends; what each host's client saw, with no failed request. A load of its own for each rollout,
/// since a load stops by itself after two minutes.
fn under_load(hosts: &[Host], rollout: impl FnOnce() -> Run) -> (Run, Vec<Tally>) {
    let loads: Vec<Load> = hosts.iter().map(|h| Load::start(h.addr, 1, "/")).collect();
    for load in &loads {
        load.wait_more(20, T);
    }
    let run = rollout();
    for load in &loads {
        load.wait_more(20, T);
    }
    let seen: Vec<Tally> = loads.into_iter().map(Load::finish).collect();
    for (host, seen) in hosts.iter().zip(&seen) {
        assert_eq!(
            seen.failed, 0,
            "{}: {:?}\n{}",
            host.name, seen.errors, run.output
        );
    }
    (run, seen)
}

#[test]
fn a_rollout_goes_host_by_host_and_stops_at_the_first_rollback() {
    // Before anything starts, so that a missing ansible is the one line of the failure.
    let ansible = ansible_playbook();
    let dir = temp_dir("fleet");
    let (old, new) = (example("fault_server"), example("server"));
    let broken = dir.join("broken");
    std::fs::write(&broken, "#!/bin/sh\nexit 1\n").unwrap();
    // Out of alphabetical order: serial: 1 goes in inventory order.
    let hosts: Vec<Host> = ["web-c", "web-a", "web-b"]
        .into_iter()
        .map(|name| Host::start(&dir, name, &old))
        .collect();
    let inventory = dir.join("inventory.ini");
    let mut text = String::from("[grace_hosts]\n");
    text.extend(hosts.iter().map(Host::inventory_line));
    // The Python that runs ansible-playbook, named: no interpreter discovery, no warning.
    text.push_str("\n[all:vars]\nansible_python_interpreter=\"{{ ansible_playbook_python }}\"\n");
    std::fs::write(&inventory, text).unwrap();
    let first: Vec<i32> = hosts.iter().map(Host::current_pid).collect();

    // A good release reaches every host, one after the other.
    let (run, seen) = under_load(&hosts, || rollout(&ansible, &dir, &inventory, &new));
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(!run.output.contains("[WARNING]"), "{}", run.output);
    let order: Vec<usize> = hosts
        .iter()
        .map(|h| {
            run.first_result(h.name)
                .unwrap_or_else(|| panic!("{}", run.output))
        })
        .collect();
    assert!(
        order.is_sorted(),
        "hosts out of inventory order\n{}",
        run.output
    );
    let mut second = Vec::new();
    for ((host, &before), seen) in hosts.iter().zip(&first).zip(&seen) {
        let status = host.status();
        assert_eq!(
            status["current"]["generation"], 2,
            "{}: {status}",
            host.name
        );
        assert_eq!(
            status["last_restart"]["result"], "ok",
            "{}: {status}",
            host.name
        );
        let pid = host.current_pid();
        assert_ne!(pid, before, "{}", host.name);
        assert_eq!(seen.pids, BTreeSet::from([before, pid]), "{}", host.name);
        host.assert_installed(&new, "the new release");
        second.push(pid);
    }

    // A broken release stops at the first host, which goes on serving the release it had; the
    // others are not touched.
    let (run, seen) = under_load(&hosts, || rollout(&ansible, &dir, &inventory, &broken));
    assert_eq!(run.code, Some(2), "{}", run.output);
    assert!(
        run.output
            .contains("grace: restart failed: generation 3 exited with status 1")
            && run.output.contains("rollout stops here"),
        "{}",
        run.output
    );
    let (stopped, untouched) = hosts.split_first().unwrap();
    assert!(run.first_result(stopped.name).is_some(), "{}", run.output);
    let status = stopped.status();
    assert_eq!(status["last_restart"]["result"], "rolled_back", "{status}");
    assert_eq!(status["restarts"], 2, "{status}");
    stopped
        .grace
        .wait_line("restart rolled back: generation 3 exited with status 1", T);
    for host in untouched {
        assert_eq!(run.first_result(host.name), None, "{}", run.output);
        assert_eq!(host.status()["restarts"], 1, "{} was restarted", host.name);
        assert_eq!(
            host.grace.count_lines("started generation 3"),
            0,
            "{}",
            host.name
        );
    }
    for ((host, &pid), seen) in hosts.iter().zip(&second).zip(&seen) {
        assert_eq!(host.current_pid(), pid, "{}", host.name);
        assert_eq!(seen.pids, BTreeSet::from([pid]), "{}", host.name);
        host.assert_installed(&new, "the release it serves");
    }
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}
