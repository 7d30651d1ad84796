//! Every descriptor grace holds for its whole life, across re-exec: the one place that says what
//! survives `execve`. The keep list, the record's `fd` lines and the adoption in the new image all
//! come from [`Held::carried`] and [`Held::adopt`], over the same [`Role`]s.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::Context;

use crate::control::{CarriedClient, CarriedSocket, ControlServer};
use crate::handoff::{Carried, Role};
use crate::listen::Listener;
use crate::notify::NotifySocket;
use crate::pidfds::Pidfds;
use crate::steer::{GroupRecord, Steering};
use crate::substitute::Substitution;
use crate::sys;

pub struct Held {
    pub listeners: Vec<Listener>,
    /// The generations' own sockets in the listeners' reuseport groups.
    pub steering: Steering,
    pub notify: NotifySocket,
    pub control: ControlServer,
    pub pidfds: Pidfds,
    /// The generations' `bind` filters.
    pub substitution: Substitution,
    /// An older grace's preload library (see `Role::Library`).
    pub library: Option<OwnedFd>,
}

impl Held {
    /// Each descriptor that must survive the exec, with what it is.
    pub fn carried(&self) -> Vec<(BorrowedFd<'_>, Role)> {
        let listeners = self.listeners.iter().map(|l| {
            (
                l.fd.as_fd(),
                Role::Listener {
                    kind: l.kind,
                    name: l.name.clone(),
                    local: l.local.clone(),
                    spec: l.spec.clone(),
                    unix_path: l.unix_path.clone(),
                },
            )
        });
        let notify = std::iter::once((
            self.notify.as_fd(),
            Role::Notify {
                name: self.notify.name.clone(),
            },
        ));
        let library = self.library.as_ref().map(|fd| (fd.as_fd(), Role::Library));
        let pidfds = self
            .pidfds
            .carried()
            .map(|(pid, fd)| (fd, Role::Pidfd { pid }));
        listeners
            .chain(notify)
            .chain(self.control.sockets().map(|(fd, display, path)| {
                (
                    fd,
                    Role::Control {
                        display: display.to_string(),
                        path: path.map(Path::to_path_buf),
                    },
                )
            }))
            .chain(self.control.clients().map(|(fd, id, partial, deadline)| {
                (
                    fd,
                    Role::Client {
                        id,
                        partial,
                        deadline,
                    },
                )
            }))
            .chain(library)
            .chain(pidfds)
            .chain(self.steering.carried())
            .chain(
                self.substitution
                    .carried()
                    .map(|(fd, generation)| (fd, Role::Filter { generation })),
            )
            .collect()
    }

    /// The record's `fd` lines; the same descriptors are the keep list.
    pub fn record(&self) -> Vec<Carried> {
        self.carried()
            .into_iter()
            .map(|(fd, role)| Carried {
                fd: fd.as_raw_fd(),
                role,
            })
            .collect()
    }

    /// Takes over what the previous image handed over (the record was validated: every fd is
    /// open, ≥ 3 and named once, so each becomes owned exactly once here).
    pub fn adopt(carried: &[Carried], groups: &[GroupRecord]) -> anyhow::Result<Held> {
        let mut listeners = Vec::new();
        let mut members = Vec::new();
        let mut notify = None;
        let mut sockets = Vec::new();
        let mut clients = Vec::new();
        let mut pidfds = Vec::new();
        let mut substitution = Substitution::default();
        let mut library = None;
        for Carried { fd, role } in carried {
            let owned = sys::adopt_fd(*fd).with_context(|| format!("adopting fd {fd}"))?;
            sys::set_cloexec(owned.as_fd(), true)?;
            match role.clone() {
                Role::Listener {
                    kind,
                    name,
                    local,
                    spec,
                    unix_path,
                } => listeners.push(Listener::from_parts(
                    owned, name, kind, local, unix_path, spec,
                )),
                Role::Notify { name } => notify = Some(NotifySocket::from_fd(owned, name)?),
                Role::Control { display, path } => sockets.push(CarriedSocket {
                    fd: owned,
                    display,
                    path,
                }),
                Role::Client {
                    id,
                    partial,
                    deadline,
                } => clients.push(CarriedClient {
                    fd: owned,
                    id,
                    partial,
                    deadline,
                }),
                Role::Library => library = Some(owned),
                Role::Pidfd { pid } => pidfds.push((pid, owned)),
                Role::Member { listener, owner } => members.push((owned, listener, owner)),
                Role::Filter { generation } => substitution.add(generation, owned),
            }
        }
        let steering = Steering::adopt(&listeners, groups, members)
            .map_err(|e| anyhow::anyhow!("adopting the steered sockets: {e}"))?;
        Ok(Held {
            listeners,
            steering,
            notify: notify.context("the handoff record has no notify socket")?,
            control: ControlServer::adopt(sockets, clients)?,
            pidfds: Pidfds::adopt(pidfds),
            substitution,
            library,
        })
    }

    /// Clears close-on-exec on exactly the carried descriptors; on failure, puts it back.
    pub fn keep_across_exec(&self) -> Result<(), String> {
        let keep = self.carried();
        for (fd, _) in &keep {
            if let Err(e) = sys::set_cloexec(*fd, false) {
                self.close_on_exec();
                return Err(format!("preparing fd {} for re-exec: {e}", fd.as_raw_fd()));
            }
        }
        Ok(())
    }

    /// After a failed `execve`: every descriptor back to close-on-exec.
    pub fn close_on_exec(&self) {
        for (fd, _) in self.carried() {
            let _ = sys::set_cloexec(fd, true);
        }
    }

    /// What grace leaves behind on its final exit (never on re-exec): nothing.
    pub fn remove_files(&self) {
        for l in &self.listeners {
            let _ = l.remove_socket_file();
        }
        self.control.remove_files();
    }
}
