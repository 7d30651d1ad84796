//! The model of one `SO_REUSEPORT` group's member array, as the kernel keeps it
//! (`net/core/sock_reuseport.c`): a socket that joins is appended; one that leaves is replaced by
//! the last member, which moves into its slot.

/// A member, by the inode of its socket (what `/proc/net/tcp` shows too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// One of grace's sockets.
    Ours(u64),
    /// Someone else's socket of the same user with `SO_REUSEPORT` on the same address.
    Foreign(u64),
}

impl Member {
    pub fn inode(self) -> u64 {
        match self {
            Member::Ours(i) | Member::Foreign(i) => i,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    members: Vec<Member>,
}

impl Group {
    pub fn from_members(members: Vec<Member>) -> Self {
        Self { members }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn join(&mut self, member: Member) {
        self.members.push(member);
    }

    /// The kernel's removal: the last member moves into the freed slot.
    pub fn leave(&mut self, inode: u64) {
        if let Some(i) = self.members.iter().position(|m| m.inode() == inode) {
            self.members.swap_remove(i);
        }
    }

    pub fn index_of(&self, inode: u64) -> Option<usize> {
        self.members.iter().position(|m| m.inode() == inode)
    }

    /// Brings the model in line with the members the kernel lists now (`listening`): members
    /// that are gone left (a server's `shutdown` on its listener, a stranger's close), and
    /// strangers that are new joined, at the end. Exact as long as it runs at every change grace
    /// makes itself: what happened in between happened after grace's last join. Returns the
    /// strangers that joined.
    pub fn reconcile(&mut self, listening: &[u64]) -> Vec<u64> {
        let gone: Vec<u64> = self
            .members
            .iter()
            .map(|m| m.inode())
            .filter(|i| !listening.contains(i))
            .collect();
        for inode in gone {
            self.leave(inode);
        }
        let new: Vec<u64> = listening
            .iter()
            .copied()
            .filter(|i| self.index_of(*i).is_none())
            .collect();
        for &inode in &new {
            self.join(Member::Foreign(inode));
        }
        new
    }

    pub fn foreign(&self) -> impl Iterator<Item = u64> + '_ {
        self.members.iter().filter_map(|m| match m {
            Member::Foreign(i) => Some(*i),
            Member::Ours(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_moves_the_last_member_into_the_slot() {
        let mut g = Group::default();
        for i in 1..=4 {
            g.join(Member::Ours(i));
        }
        g.leave(2);
        assert_eq!(
            g.members(),
            [Member::Ours(1), Member::Ours(4), Member::Ours(3)]
        );
        g.leave(3);
        assert_eq!(g.members(), [Member::Ours(1), Member::Ours(4)]);
        g.leave(99);
        assert_eq!(g.index_of(4), Some(1));
    }

    #[test]
    fn reconcile_takes_in_strangers_and_drops_the_departed() {
        let mut g = Group::from_members(vec![Member::Ours(1), Member::Ours(2), Member::Ours(3)]);
        assert_eq!(g.reconcile(&[1, 3, 2, 7]), vec![7]);
        assert_eq!(g.index_of(7), Some(3));
        assert!(g.reconcile(&[1, 3, 7]).is_empty());
        assert_eq!(
            g.members(),
            [Member::Ours(1), Member::Foreign(7), Member::Ours(3)]
        );
        assert_eq!(g.foreign().collect::<Vec<_>>(), vec![7]);
    }
}
