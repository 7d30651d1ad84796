//! The sockets grace owns for its whole life: `--listen` specs, and binding them (or adopting the
//! fds grace inherited) into close-on-exec listeners.

mod bind;
mod local;
mod spec;

pub use bind::{BindOptions, Listener, SocketKind, bind_all};
// Each generation's own socket in the group (steer/): the steered handover is being built on it.
#[allow(unused_imports)]
pub use bind::new_member;
pub use local::{Local, Proto};
pub use spec::{Addr, ListenSpec};
