//! The sockets grace owns for its whole life: `--listen` specs, and binding them (or adopting the
//! fds grace inherited) into close-on-exec listeners.

mod bind;
mod local;
mod spec;

pub use bind::{BindOptions, Listener, SocketKind, bind_all};
pub use bind::{new_member, reuses_port};
pub use local::{Local, Proto};
pub use spec::{Addr, ListenSpec};
