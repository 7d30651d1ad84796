//! The steered sockets of a running grace: for each TCP or UDP listener, a socket per generation
//! in one reuseport group, the model of the group's order, and the program that sends new
//! connections to the generation that should get them.
//!
//! The listener's descriptor (`Listener::fd`) is always the socket new connections go to, the
//! *target*: the one grace bound (or inherited) at first, then each generation's own as traffic
//! moves to it; so the group, and the port, live as long as grace does. The first generation gets
//! the listener's socket; every later one gets a new member, unless nothing serves (a crash): then
//! it takes over the target, with the clients that queued there. A generation's own socket gets
//! client connections only once the supervisor steers to it (at ready); before that only grace's
//! probe reaches it, recognised by its source port.
//!
//! Closing a member makes the kernel move the last member into its slot. If the last member is
//! the target, its index changes under the running program, and until the program is replaced the
//! kernel would hash new connections over every member. So a member whose generation is gone is
//! closed only when that cannot misdirect anything: it is the last member, or the target is not,
//! or the target is all that is left (an index out of range falls back to the hash, over that one
//! socket). Otherwise it waits for a later change of the group.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::handoff::Role;
use crate::listen::{Listener, Proto, new_member, reuses_port};
use crate::supervisor::GenId;
use crate::sys;

use super::{Group, Member, diag, inode, program};

/// One of grace's sockets in a group.
#[derive(Debug)]
struct Socket {
    /// `None` for the target: it is the listener's own descriptor.
    fd: Option<OwnedFd>,
    inode: u64,
    /// The generation it was given to (after that one is gone, until it is taken over or closed).
    owner: Option<GenId>,
}

#[derive(Debug)]
struct Steered {
    /// Index into the listeners.
    listener: usize,
    proto: Proto,
    addr: SocketAddr,
    /// Ours.
    sockets: Vec<Socket>,
    group: Group,
    /// The member new connections go to.
    target: u64,
    /// grace's probe connections, by source port, go to this member.
    probe: Option<(u16, u64)>,
    /// Strangers already reported.
    reported: Vec<u64>,
}

impl Steered {
    /// Closes the members whose generations are gone, as far as that moves nothing the program
    /// names (see the module documentation). Returns the lines to log.
    fn close_unowned(&mut self, listeners: &[Listener]) -> Vec<String> {
        let mut logs = Vec::new();
        loop {
            logs.extend(self.reconcile());
            let members = self.group.members();
            let last = members.last().map(|m| m.inode());
            let probed = self.probe.map(|(_, to)| to);
            // Closing a member moves the last one into its slot: harmless unless the program
            // names the last one (as the target or the probe's), or the target is all that
            // stays (an index out of range then falls back to the hash, over that one).
            let named = last.is_some_and(|l| l == self.target || Some(l) == probed);
            let harmless =
                !named || (members.len() == 2 && probed.is_none_or(|p| p == self.target));
            let Some(i) = self.sockets.iter().position(|s| {
                s.fd.is_some()
                    && s.owner.is_none()
                    && s.inode != self.target
                    && Some(s.inode) != probed
                    && (harmless || last == Some(s.inode))
            }) else {
                break;
            };
            let closed = self.sockets.remove(i);
            let ino = closed.inode;
            drop(closed);
            logs.extend(self.reconcile());
            if self.group.index_of(ino).is_some() {
                logs.push(format!(
                    "{}: a process outside grace's generations still holds socket {ino}: it stays in the group",
                    self.addr
                ));
                self.reported.push(ino);
            }
            if let Err(e) = self.attach(listeners) {
                logs.push(format!(
                    "{}: replacing the steering program: {}",
                    self.addr,
                    e.desc()
                ));
            }
        }
        logs
    }
}

/// A group as the handoff record carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub listener: usize,
    /// The target: the listener's own descriptor in the record.
    pub target: u64,
    pub target_owner: Option<GenId>,
    pub members: Vec<Member>,
}

/// Handshakes in progress to an old generation's sockets when traffic moved away from it: their
/// ports and clients.
#[derive(Debug)]
struct Pending {
    generation: GenId,
    clients: HashSet<(u16, SocketAddr)>,
    /// When traffic moved (grace's clock).
    since: u64,
}

/// How long the handshakes in progress at a switch are waited for. A client that is there
/// completes its handshake within a round trip (its data carries the ACK even if the ACK itself
/// was lost); one still in `SYN_RECV` after this is most likely gone (a scanner, a spoofed SYN:
/// the kernel resends its SYN-ACK for about a minute), and waiting for it would hold the old
/// generation for the whole drain timeout. The snapshot is taken just after the switch, so it may
/// also name handshakes to the new generation: they end as fast.
pub(super) const HANDSHAKE_WAIT: u64 = 2_000;

/// A finishing generation's connections to the steered ports, still open at its last idle check
/// (by inode).
#[derive(Debug)]
struct Connections {
    generation: GenId,
    open: HashSet<u64>,
}

#[derive(Debug, Default)]
pub struct Steering {
    groups: Vec<Steered>,
    pending: Vec<Pending>,
    /// What the idle checks found of each finishing generation's connections.
    open: Vec<Connections>,
    /// `net.ipv4.tcp_migrate_req` is on: a closing member's queue can move to a member of a
    /// generation in its idle wait, which then accepts new connections after all.
    migrates: bool,
    /// What was found while starting a generation, said at the next steer or collect.
    logs: Vec<String>,
}

impl Steering {
    /// Decides, for each listener, whether it is steered; returns the lines to log about those
    /// that cannot be (shared by every generation, as before).
    pub fn new(listeners: &[Listener]) -> (Self, Vec<String>) {
        let mut steering = Steering {
            migrates: std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
                .is_ok_and(|v| v.trim() == "1"),
            ..Steering::default()
        };
        let mut logs = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            match steerable(l) {
                Ok((proto, addr)) => {
                    let anchor = match inode(l.fd.as_fd()) {
                        Ok(inode) => inode,
                        Err(e) => {
                            logs.push(format!("{}: {e}: one socket for every generation", l.local));
                            continue;
                        }
                    };
                    let others: Vec<u64> = diag::bound_on(proto, addr)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|&x| x != anchor)
                        .collect();
                    if !others.is_empty() {
                        logs.push(format!(
                            "{}: other sockets share its SO_REUSEPORT group (inodes {others:?}): one socket for every generation, not steered",
                            l.local
                        ));
                        continue;
                    }
                    let g = Steered {
                        listener: i,
                        proto,
                        addr,
                        sockets: vec![Socket {
                            fd: None,
                            inode: anchor,
                            owner: None,
                        }],
                        group: Group::from_members(vec![Member::Ours(anchor)]),
                        target: anchor,
                        probe: None,
                        reported: Vec::new(),
                    };
                    match g.attach(listeners) {
                        Ok(()) => steering.groups.push(g),
                        Err(e) => logs.push(format!(
                            "{}: the kernel refused the steering program ({}): one socket for every generation",
                            l.local,
                            e.desc()
                        )),
                    }
                }
                Err(why) => logs.push(format!(
                    "{}: {why}: one socket for every generation",
                    l.local
                )),
            }
        }
        (steering, logs)
    }

    /// Whether any listener is steered (else a handover is the shared socket's: stop at ready).
    pub fn any(&self) -> bool {
        !self.groups.is_empty()
    }

    /// The sockets of a generation about to start, in listener order: a new member of each group,
    /// or with `take_over` (nothing serves) the member new connections go to now. Shared
    /// listeners give their one socket. On failure nothing is left joined.
    pub fn sockets_for(
        &mut self,
        listeners: &[Listener],
        generation: GenId,
        take_over: bool,
    ) -> Result<Vec<RawFd>, String> {
        let mut joined = Vec::new();
        for g in &mut self.groups {
            if take_over {
                let target = g.target;
                if let Some(s) = g.sockets.iter_mut().find(|s| s.inode == target) {
                    s.owner = Some(generation);
                }
                continue;
            }
            self.logs.extend(g.reconcile());
            let anchor = &listeners[g.listener].fd;
            let fd = match new_member(anchor, g.proto) {
                Ok(fd) => fd,
                Err(e) => {
                    self.abandon(listeners, &joined);
                    return Err(format!("{e:#}"));
                }
            };
            let Ok(ino) = inode(fd.as_fd()) else {
                let addr = g.addr;
                // The newest member: closing it moves nothing.
                drop(fd);
                self.abandon(listeners, &joined);
                return Err(format!("{addr}: cannot identify a new socket"));
            };
            g.group.join(Member::Ours(ino));
            g.sockets.push(Socket {
                fd: Some(fd),
                inode: ino,
                owner: Some(generation),
            });
            joined.push(ino);
        }
        Ok(listeners
            .iter()
            .enumerate()
            .map(
                |(i, l)| match self.groups.iter().find(|g| g.listener == i) {
                    Some(g) => g
                        .sockets
                        .iter()
                        .rev()
                        .find(|s| s.owner == Some(generation))
                        .map_or(l.fd.as_raw_fd(), |s| s.raw_fd(l)),
                    None => l.fd.as_raw_fd(),
                },
            )
            .collect())
    }

    /// Closes the members just joined (newest first: each is the last one then, so nothing moves).
    fn abandon(&mut self, listeners: &[Listener], joined: &[u64]) {
        for g in &mut self.groups {
            for &ino in joined.iter().rev() {
                if let Some(i) = g.sockets.iter().position(|s| s.inode == ino) {
                    g.sockets.remove(i);
                    g.group.leave(ino);
                }
            }
            let _ = g.attach(listeners);
        }
    }

    /// New connections go to `generation`'s sockets from now on; they become the listeners'
    /// descriptors. Returns the lines to log (the handshakes in progress to the previous target
    /// are waited for by [`Steering::queued`]).
    pub fn steer(&mut self, listeners: &mut [Listener], generation: GenId) -> Vec<String> {
        let mut logs = std::mem::take(&mut self.logs);
        let mut moved = Vec::new();
        for g in &mut self.groups {
            // What can close while the previous target is still named closes now, and what
            // can once the new one is, just after: nothing lingers until a later handover.
            logs.extend(g.close_unowned(listeners));
            let Some(new) = g
                .sockets
                .iter()
                .position(|s| s.owner == Some(generation) && s.fd.is_some())
            else {
                continue;
            };
            let Some(old) = g.sockets.iter().position(|s| s.fd.is_none()) else {
                continue;
            };
            let fd = g.sockets[new].fd.take().expect("a member of its own");
            g.sockets[old].fd = Some(std::mem::replace(&mut listeners[g.listener].fd, fd));
            let old_owner = g.sockets[old].owner;
            let new = g.sockets[new].inode;
            g.target = new;
            if g.probe.is_some_and(|(_, to)| to == new) {
                g.probe = None;
            }
            if let Err(e) = g.attach(listeners) {
                logs.push(format!(
                    "{}: replacing the steering program: {}",
                    g.addr,
                    e.desc()
                ));
            }
            logs.extend(g.close_unowned(listeners));
            if let (Some(generation), Proto::Tcp) = (old_owner, g.proto) {
                moved.push((generation, g.addr.port()));
            }
        }
        // One look at the kernel's table for every port moved (it costs the same for one).
        if !moved.is_empty() {
            let ports: Vec<u16> = moved.iter().map(|&(_, port)| port).collect();
            let now = diag::handshakes(&ports).unwrap_or_else(|e| {
                logs.push(format!(
                    "the handshakes in progress at the switch are unknown ({}): not waited for",
                    e.desc()
                ));
                HashSet::new()
            });
            for &(generation, _) in &moved {
                if self.pending.iter().any(|p| p.generation == generation) {
                    continue;
                }
                let clients = now
                    .iter()
                    .filter(|(port, _)| moved.contains(&(generation, *port)))
                    .copied()
                    .collect();
                self.pending.push(Pending {
                    generation,
                    clients,
                    since: sys::now(),
                });
            }
        }
        logs
    }

    /// Whether `generation` has a socket of its own for listener `listener` (steered), rather
    /// than the one every generation shares.
    pub fn owns(&self, generation: GenId, listener: usize) -> bool {
        self.groups.iter().any(|g| {
            g.listener == listener && g.sockets.iter().any(|s| s.owner == Some(generation))
        })
    }

    /// The socket `generation` has for listener `listener`: its own member, or the listener's
    /// descriptor (shared, or the target it took over).
    pub fn socket_of<'a>(
        &'a self,
        listeners: &'a [Listener],
        generation: GenId,
        listener: usize,
    ) -> BorrowedFd<'a> {
        self.groups
            .iter()
            .find(|g| g.listener == listener)
            .and_then(|g| g.sockets.iter().find(|s| s.owner == Some(generation)))
            .map_or(listeners[listener].fd.as_fd(), |s| {
                s.borrow(&listeners[listener])
            })
    }

    /// Where `generation`'s readiness probe connects (the first steered TCP listener, over
    /// loopback) and the socket whose queue shows whether the server accepted it.
    pub fn probe_target<'a>(
        &'a self,
        listeners: &'a [Listener],
        generation: GenId,
    ) -> Option<(SocketAddr, BorrowedFd<'a>)> {
        let g = self.groups.iter().find(|g| g.proto == Proto::Tcp)?;
        let s = g.sockets.iter().find(|s| s.owner == Some(generation))?;
        let mut to = g.addr;
        if to.ip().is_unspecified() {
            to.set_ip(if to.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        Some((to, s.borrow(&listeners[g.listener])))
    }

    /// Connections from source port `port` go to `generation`'s socket (its probe's next attempt).
    pub fn probe_from(&mut self, listeners: &[Listener], generation: GenId, port: u16) {
        if let Some(g) = self.groups.iter_mut().find(|g| g.proto == Proto::Tcp)
            && let Some(s) = g.sockets.iter().find(|s| s.owner == Some(generation))
        {
            g.probe = Some((port, s.inode));
            let _ = g.attach(listeners);
        }
    }

    pub fn end_probe(&mut self, listeners: &[Listener], generation: GenId) {
        for g in &mut self.groups {
            let probed = g.probe.is_some_and(|(_, to)| {
                g.sockets
                    .iter()
                    .any(|s| s.inode == to && s.owner == Some(generation))
            });
            if probed {
                g.probe = None;
                let _ = g.attach(listeners);
            }
        }
    }

    /// What still waits for `generation` in its sockets: connections in their accept queues,
    /// datagrams in their receive queues, and handshakes that were in progress when traffic moved
    /// away from it (they complete into its queue).
    pub fn queued(&mut self, listeners: &[Listener], generation: GenId) -> (usize, Option<String>) {
        let mut n = 0usize;
        for g in &self.groups {
            for s in g.sockets.iter().filter(|s| s.owner == Some(generation)) {
                if s.inode == g.target {
                    continue;
                }
                let fd = s.borrow(&listeners[g.listener]);
                n += match g.proto {
                    Proto::Tcp => sys::accept_queue_len(fd).unwrap_or(0) as usize,
                    Proto::Udp => sys::datagram_queued(fd).unwrap_or(0).min(1) as usize,
                };
            }
        }
        let mut log = None;
        if let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.generation == generation && !p.clients.is_empty())
        {
            if sys::now().saturating_sub(p.since) > HANDSHAKE_WAIT {
                log = Some(format!(
                    "generation {generation}: {} handshakes still incomplete {}s after the switch: not waited for",
                    p.clients.len(),
                    HANDSHAKE_WAIT / 1000
                ));
                p.clients.clear();
            } else {
                let ports: Vec<u16> = p.clients.iter().map(|&(port, _)| port).collect();
                // Unknown this time: still counted, until they complete or the bound.
                if let Ok(now) = diag::handshakes(&ports) {
                    p.clients.retain(|c| now.contains(c));
                }
                n += p.clients.len();
            }
        }
        (n, log)
    }

    /// How many connections to the steered TCP ports `generation` still has open. At the first
    /// check, `held` lists the sockets its processes hold (a scan of their descriptors), and the
    /// kernel's table says which are connections to the ports; after that only the kernel is
    /// asked which of those are still open and held (a closed one loses its inode), so a check
    /// costs one walk of the table, not one `readlink` per descriptor. That is exact because its
    /// idle wait begins once its queues are empty and its sockets get no new connection, unless
    /// `tcp_migrate_req` can move another member's queue onto them: then every check scans.
    /// When the kernel cannot be asked, the last answer stands (or every socket it holds counts,
    /// at the first check), so a failure never ends the wait early.
    pub fn open_connections(
        &mut self,
        generation: GenId,
        mut held: impl FnMut() -> HashSet<u64>,
    ) -> usize {
        let ports = self.tcp_ports();
        let known = self.open.iter().position(|c| c.generation == generation);
        if let Some(i) = known
            && !self.migrates
        {
            let c = &mut self.open[i];
            if !c.open.is_empty()
                && let Ok(open) = diag::connections(&ports, &c.open)
            {
                c.open = open;
            }
            return c.open.len();
        }
        let mut held = held();
        for g in &self.groups {
            for m in g.group.members() {
                held.remove(&m.inode());
            }
        }
        let Ok(open) = diag::connections(&ports, &held) else {
            return known.map_or(held.len(), |i| self.open[i].open.len());
        };
        let n = open.len();
        match known {
            Some(i) => self.open[i].open = open,
            None => self.open.push(Connections { generation, open }),
        }
        n
    }

    /// The TCP ports of the steered listeners (a generation's connections are to these).
    pub fn tcp_ports(&self) -> Vec<u16> {
        self.groups
            .iter()
            .filter(|g| g.proto == Proto::Tcp)
            .map(|g| g.addr.port())
            .collect()
    }

    /// Lets go of what belongs to generations that are gone (`live` are the others): their
    /// sockets close when that moves no member new connections go to (see the module
    /// documentation), the others at a later call. Returns the lines to log.
    pub fn collect(&mut self, listeners: &[Listener], live: &[GenId]) -> Vec<String> {
        self.pending.retain(|p| live.contains(&p.generation));
        self.open.retain(|o| live.contains(&o.generation));
        let mut logs = std::mem::take(&mut self.logs);
        for g in &mut self.groups {
            for s in &mut g.sockets {
                if s.owner.is_some_and(|o| !live.contains(&o)) {
                    s.owner = None;
                }
            }
            logs.extend(g.close_unowned(listeners));
        }
        logs
    }

    /// How many sockets each steered listener's group has (grace's and strangers'), by listener.
    pub fn group_sizes(&self) -> Vec<(usize, usize)> {
        self.groups
            .iter()
            .map(|g| (g.listener, g.group.members().len()))
            .collect()
    }

    /// The members to carry across `execve` (the targets travel as listeners).
    pub fn carried(&self) -> impl Iterator<Item = (BorrowedFd<'_>, Role)> + '_ {
        self.groups.iter().flat_map(|g| {
            g.sockets.iter().filter_map(move |s| {
                s.fd.as_ref().map(|fd| {
                    (
                        fd.as_fd(),
                        Role::Member {
                            listener: g.listener,
                            owner: s.owner,
                        },
                    )
                })
            })
        })
    }

    pub fn record(&self) -> Vec<GroupRecord> {
        self.groups
            .iter()
            .map(|g| GroupRecord {
                listener: g.listener,
                target: g.target,
                target_owner: g
                    .sockets
                    .iter()
                    .find(|s| s.fd.is_none())
                    .and_then(|s| s.owner),
                members: g.group.members().to_vec(),
            })
            .collect()
    }

    /// Continues with the groups the previous image handed over. `members`: the adopted member
    /// sockets with their roles; a listener without a group record is shared.
    pub fn adopt(
        listeners: &[Listener],
        records: &[GroupRecord],
        mut members: Vec<(OwnedFd, usize, Option<GenId>)>,
    ) -> Result<Self, String> {
        let mut steering = Steering::default();
        for r in records {
            let l = listeners
                .get(r.listener)
                .ok_or_else(|| format!("group of listener {} that does not exist", r.listener))?;
            let (proto, addr) = steerable(l).map_err(|why| format!("{}: {why}", l.local))?;
            let target = inode(l.fd.as_fd()).map_err(|e| e.to_string())?;
            if target != r.target {
                return Err(format!(
                    "{}: the listener is not the steering target",
                    l.local
                ));
            }
            let mut sockets = vec![Socket {
                fd: None,
                inode: target,
                owner: r.target_owner,
            }];
            let (mine, rest): (Vec<_>, Vec<_>) =
                members.into_iter().partition(|(_, i, _)| *i == r.listener);
            members = rest;
            for (fd, _, owner) in mine {
                let ino = inode(fd.as_fd()).map_err(|e| e.to_string())?;
                sockets.push(Socket {
                    fd: Some(fd),
                    inode: ino,
                    owner,
                });
            }
            let group = Group::from_members(r.members.clone());
            let mut g = Steered {
                listener: r.listener,
                proto,
                addr,
                sockets,
                reported: group.foreign().collect(),
                group,
                target: r.target,
                probe: None,
            };
            // A stranger that joined since the previous image last looked is said at the next
            // handover, like any other.
            let found = g.reconcile();
            steering.logs.extend(found);
            g.attach(listeners).map_err(|e| e.to_string())?;
            steering.groups.push(g);
        }
        if let Some((_, i, _)) = members.first() {
            return Err(format!(
                "a member socket of listener {i}, which has no group"
            ));
        }
        Ok(steering)
    }
}

/// Why a listener cannot be steered, or its transport and address.
fn steerable(l: &Listener) -> Result<(Proto, SocketAddr), &'static str> {
    let Some((proto, addr)) = l.local.inet() else {
        return Err("not a TCP or UDP socket (steering needs SO_REUSEPORT)");
    };
    if !reuses_port(&l.fd) {
        return Err("an inherited socket without SO_REUSEPORT");
    }
    Ok((proto, addr))
}

impl Socket {
    fn borrow<'a>(&'a self, listener: &'a Listener) -> BorrowedFd<'a> {
        match &self.fd {
            Some(fd) => fd.as_fd(),
            None => listener.fd.as_fd(),
        }
    }

    fn raw_fd(&self, listener: &Listener) -> RawFd {
        self.borrow(listener).as_raw_fd()
    }
}

impl Steered {
    /// Replaces the group's program with one for the current target and probe.
    fn attach(&self, listeners: &[Listener]) -> nix::Result<()> {
        let index = |ino: u64| self.group.index_of(ino);
        let Some(target) = index(self.target) else {
            return Err(nix::errno::Errno::ENOENT);
        };
        let probe = self
            .probe
            .and_then(|(port, to)| index(to).map(|i| (port, i)));
        sys::attach_reuseport_cbpf(listeners[self.listener].fd.as_fd(), &program(target, probe))
    }

    /// Brings the model in line with the kernel's list of sockets on the address; reports a
    /// stranger once.
    fn reconcile(&mut self) -> Vec<String> {
        let Some(listening) = diag::bound_on(self.proto, self.addr) else {
            // The kernel cannot say (no sock_diag): nothing to learn.
            return Vec::new();
        };
        if listening.is_empty() {
            return Vec::new();
        }
        let mut logs = Vec::new();
        for stranger in self.group.reconcile(&listening) {
            if !self.reported.contains(&stranger) {
                self.reported.push(stranger);
                logs.push(format!(
                    "{} {}: a socket grace did not create (inode {stranger}) joined its SO_REUSEPORT group; steering sends it no connections, but it may get some while the group changes: find the process that binds it",
                    self.proto, self.addr
                ));
            }
        }
        logs
    }
}
