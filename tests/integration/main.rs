//! Integration tests: the real `grace` binary, real sockets on loopback, real servers.

mod contract;
mod harness;
mod load;
mod restart;
mod rollback;
mod stop;
