//! What grace tells systemd when it runs under it (`NOTIFY_SOCKET` in grace's own environment):
//! READY, RELOADING with MONOTONIC_USEC, STATUS, STOPPING, EXTEND_TIMEOUT_USEC. A no-op otherwise.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

use crate::supervisor::{Cause, Outcome};

fn tell(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("sd_notify: {e}");
    }
}

/// A restart begins: systemd shows the unit as reloading until the next READY=1.
pub fn reloading() {
    if let Ok(usec) = NotifyState::monotonic_usec_now() {
        tell(&[
            NotifyState::Reloading,
            usec,
            NotifyState::Status("restarting"),
        ]);
    }
}

/// A start or restart ended.
pub fn outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Ready {
            generation,
            pid,
            cause,
        } => {
            let status = format!("serving: generation {generation} (pid {pid})");
            match cause {
                Cause::Initial | Cause::Restart => {
                    tell(&[NotifyState::Ready, NotifyState::Status(&status)])
                }
                Cause::Crash => tell(&[NotifyState::Status(&status)]),
            }
        }
        Outcome::RolledBack { generation, reason } => tell(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("restart failed: generation {generation} {reason}")),
        ]),
        Outcome::Failed { reason } => tell(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("restart failed: {reason}")),
        ]),
    }
}

pub fn stopping(drain_timeout: Duration) {
    tell(&[NotifyState::Stopping]);
    extend_timeout(drain_timeout);
}

/// Asks systemd for `wait` more (plus a margin for grace's own work) before it times out.
pub fn extend_timeout(wait: Duration) {
    let usec = (wait + Duration::from_secs(5))
        .as_micros()
        .min(u32::MAX as u128) as u32;
    tell(&[NotifyState::ExtendTimeoutUsec(usec)]);
}
