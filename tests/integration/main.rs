//! Integration tests: the real `grace` binary, real sockets on loopback, real servers.

mod bad_input;
mod contract;
mod docker;
mod faults;
mod finishing;
mod fleet;
mod gunicorn;
mod harness;
mod inject;
mod load;
mod operate;
mod pid1;
mod restart;
mod rollback;
mod steered;
mod stop;
mod substitute;
mod systemd;
mod trust;
mod unblocked;
mod upgrade;
