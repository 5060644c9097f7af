//! The one place children are waited for. SIGCHLD (delivered to the signal thread) reaps every
//! exited child with `waitpid(-1)`: the agent's own processes report to whoever spawned them, and,
//! as PID 1, orphans reparented to us are reaped too, so no zombie stays.
//!
//! Spawning happens under the same lock as reaping, so a child is always registered before its
//! exit can be collected (and std's own wait on a failed exec never races with us).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use kiln_agent_proto::ExitStatus;

use crate::sys;

#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<u32, Sender<ExitStatus>>>,
}

impl Reaper {
    /// Spawns `cmd` and registers it; the receiver gets its exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = channel();
        waiting.insert(child.id(), tx);
        Ok((child, rx))
    }

    /// Reaps every exited child (call on SIGCHLD).
    pub fn reap(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match sys::reap_one() {
                Ok(Some((pid, status))) => match waiting.remove(&pid) {
                    Some(tx) => {
                        tracing::debug!(pid, %status, "child exited");
                        let _ = tx.send(status);
                    }
                    None => tracing::debug!(pid, %status, "reaped an orphan"),
                },
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    /// Pids of registered children that have not exited yet.
    pub fn live(&self) -> Vec<u32> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }
}
