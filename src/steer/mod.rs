//! Steering: one `SO_REUSEPORT` group per address, a socket in it per generation, and a classic
//! BPF program that tells the kernel which member gets each new connection.
//!
//! The kernel keeps a group's members in an array and runs the program on the first packet of a
//! connection (a TCP SYN, a UDP datagram); the program returns an index into that array (an index
//! out of range falls back to the kernel's hash, which is what steering must never need). So grace
//! keeps an exact model of the array ([`Group`]): a socket that joins (TCP at `listen`, UDP at
//! `bind`) is appended; one that leaves (its last copy closed, or `shutdown`) is replaced by the
//! last member, which moves into its slot. `tests.rs` checks both against the kernel.
//!
//! The program ([`program`]) sends everything to the target generation's member, except
//! connections from grace's own readiness probe, recognised by their source port, which go to the
//! generation being probed.

mod diag;
pub mod group;
mod steering;
#[cfg(test)]
mod tests;

use nix::libc::{self, sock_filter};

pub use diag::socket_inodes;
pub use group::{Group, Member};
pub use steering::{GroupRecord, Steering};

/// Builds the program: connections whose source port is `probe.0` go to member `probe.1`, all
/// others to member `target`.
pub fn program(target: usize, probe: Option<(u16, usize)>) -> Vec<sock_filter> {
    let ret = |k: usize| stmt(libc::BPF_RET | libc::BPF_K, k as u32);
    let Some((port, probed)) = probe else {
        return vec![ret(target)];
    };
    // The program sees the packet from the transport payload on; the headers are reached through
    // the network-header offset. IPv4 headers vary in length (IHL), IPv6 ones are 40 bytes (grace
    // probes over loopback, without extension headers). The source port is the first field of
    // both TCP and UDP headers.
    let net = libc::SKF_NET_OFF as u32;
    vec![
        // 0: A = version and IHL
        stmt(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, net),
        // 1: A >>= 4
        stmt(libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K, 4),
        // 2: IPv6? to 6
        jump(libc::BPF_JEQ, 6, 3, 0),
        // 3: X = 4 * IHL
        stmt(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, net),
        // 4: A = the source port after the IPv4 header
        stmt(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, net),
        // 5: to 7
        stmt(libc::BPF_JMP | libc::BPF_JA, 1),
        // 6: A = the source port after the IPv6 header
        stmt(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, net + 40),
        // 7: the probe's? to 9
        jump(libc::BPF_JEQ, u32::from(port), 1, 0),
        // 8
        ret(target),
        // 9
        ret(probed),
    ]
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(op: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The inode of a socket, as `/proc/net/tcp` and `/proc/<pid>/fd` show it.
pub fn inode(socket: std::os::fd::BorrowedFd<'_>) -> nix::Result<u64> {
    nix::sys::stat::fstat(socket).map(|st| st.st_ino)
}
