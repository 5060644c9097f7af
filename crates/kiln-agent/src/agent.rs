//! State shared by every connection: the role, the reaper, the configuration, the main process,
//! and the one channel through which anything asks for the guest (or the agent) to stop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_agent_proto::{ExecRequest, ExitStatus, ShutdownAction};

use crate::config::AgentConfig;
use crate::reaper::Reaper;
use crate::spawn::{self, StdioMode};

/// Default time between SIGTERM and SIGKILL when stopping.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The guest's PID 1: mounts, reaps orphans, powers the VM off.
    Init,
    /// Under another init (a service): stopping the guest is asked of that init.
    Service,
    /// `--listen-unix` on a host, for tests and debugging: never touches the machine (no mounts,
    /// no clock, no power); Shutdown stops only the agent and its own processes.
    Test,
}

/// What a stop request stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    Guest(ShutdownAction),
    /// Only the agent (SIGTERM to an agent that is not PID 1).
    AgentOnly,
}

#[derive(Debug, Clone)]
pub struct StopRequest {
    pub kind: StopKind,
    pub grace: Duration,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MainPhase {
    None,
    WaitingForAttach,
    Running,
    Exited(ExitStatus),
}

pub struct Agent {
    pub role: Role,
    pub reaper: Reaper,
    /// Why the config file could not be used (then there is no main process).
    pub config_error: Option<String>,
    /// Where passwd and group are read.
    pub etc: PathBuf,
    /// This boot's configuration (none until the host sends it, when there was no config file)
    /// and the main process's phase, changed together.
    state: Mutex<State>,
    main_cond: Condvar,
    stop_tx: Mutex<Sender<StopRequest>>,
    stopping: AtomicBool,
    connections: AtomicUsize,
}

struct State {
    config: Option<Arc<AgentConfig>>,
    main: MainPhase,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn initial_phase(config: &AgentConfig) -> MainPhase {
    match &config.main {
        None => MainPhase::None,
        Some(m) if m.wait_for_attach => MainPhase::WaitingForAttach,
        Some(_) => MainPhase::Running,
    }
}

/// Counts a live host connection while it exists.
pub struct ConnectionGuard(Arc<Agent>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Agent {
    /// An agent configured by `config` (a config file), or waiting for the host's `Configure`.
    pub fn new(
        role: Role,
        config: Option<AgentConfig>,
        config_error: Option<String>,
        stop_tx: Sender<StopRequest>,
    ) -> Agent {
        let main = config.as_ref().map_or(MainPhase::None, initial_phase);
        Agent {
            role,
            reaper: Reaper::default(),
            config_error,
            etc: PathBuf::from("/etc"),
            state: Mutex::new(State { config: config.map(Arc::new), main }),
            main_cond: Condvar::new(),
            stop_tx: Mutex::new(stop_tx),
            stopping: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        }
    }

    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(self.clone())
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Asks the main thread to stop; the first request wins.
    pub fn request_stop(&self, req: StopRequest) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!("stopping ({:?}): {}", req.kind, req.reason);
        let _ = lock(&self.stop_tx).send(req);
    }

    /// This boot's configuration (the defaults until there is one).
    pub fn config(&self) -> Arc<AgentConfig> {
        lock(&self.state).config.clone().unwrap_or_default()
    }

    pub fn is_configured(&self) -> bool {
        lock(&self.state).config.is_some()
    }

    pub fn has_main(&self) -> bool {
        lock(&self.state).config.as_ref().is_some_and(|c| c.main.is_some())
    }

    /// Takes the host's configuration for this boot: applies what it says about the machine
    /// (clock, hostname, ssh key, name servers: PID 1 only, each failure reported on the console)
    /// and starts a main process that does not wait for an attach. Only once per boot.
    pub fn configure(self: &Arc<Self>, config: AgentConfig) -> Result<(), String> {
        crate::config::check(&config)?;
        {
            let mut state = lock(&self.state);
            if state.config.is_some() {
                return Err("the agent is already configured for this boot (a VM is configured once, \
                     when it starts)"
                    .into());
            }
            state.main = initial_phase(&config);
            state.config = Some(Arc::new(config.clone()));
        }
        if self.role == Role::Init {
            crate::init::apply_guest_config(&config);
        }
        self.start_detached_main();
        Ok(())
    }

    /// Starts the main process when it does not wait for an attach: stdin /dev/null, output on
    /// the agent's own stdout/stderr (the console as PID 1).
    pub fn start_detached_main(self: &Arc<Self>) {
        let Some(cfg) = self.config().main.clone().filter(|m| !m.wait_for_attach) else { return };
        match spawn::spawn(&self.reaper, &cfg.exec, StdioMode::Console, &self.etc) {
            Ok(sp) => {
                tracing::info!(pid = sp.pid, "main process started: {:?}", cfg.exec.argv);
                let agent = self.clone();
                std::thread::spawn(move || {
                    let status = sp.exit.recv().unwrap_or(ExitStatus::Code(255));
                    agent.main_exited(status);
                });
            }
            Err(e) => self.main_failed(&e),
        }
    }

    /// For AttachMain: the request to run when the main process waits for an attach.
    pub fn take_main_for_attach(&self) -> Result<ExecRequest, String> {
        let mut state = lock(&self.state);
        let main = state.config.as_ref().and_then(|c| c.main.clone());
        match (state.main, main) {
            (MainPhase::WaitingForAttach, Some(cfg)) => {
                state.main = MainPhase::Running;
                Ok(cfg.exec)
            }
            (MainPhase::None, _) | (_, None) => Err(self.no_main_reason(state.config.is_some())),
            (MainPhase::Running, _) => Err("the main process is already running (it did not wait for an \
                 attach, or another host attached); use WaitMain for its exit"
                .into()),
            (MainPhase::Exited(s), _) => Err(format!("the main process already exited ({s})")),
        }
    }

    /// Why there is no main process (call with the state lock held: `configured` is from it).
    fn no_main_reason(&self, configured: bool) -> String {
        match &self.config_error {
            Some(e) => format!("no main process: {e}"),
            None if !configured => {
                "no main process yet: the host has not configured the agent for this boot".into()
            }
            None => "no main process is configured (the configuration has no \"main\")".into(),
        }
    }

    /// The main process could not start: it counts as exited with 127 (like a shell).
    pub fn main_failed(self: &Arc<Self>, err: &dyn std::error::Error) {
        eprintln!("kiln-agent: cannot start the main process: {}", crate::error_chain(err));
        self.main_exited(ExitStatus::Code(127));
    }

    /// Records the main process's exit, prints the console line, and powers off (after letting
    /// connected hosts collect the exit for up to `exit_linger_ms`).
    pub fn main_exited(self: &Arc<Self>, status: ExitStatus) {
        lock(&self.state).main = MainPhase::Exited(status);
        self.main_cond.notify_all();
        // The fallback channel for the exit code: one parseable line on the console.
        match status {
            ExitStatus::Code(c) => eprintln!("KILN-MAIN-EXIT code={c}"),
            ExitStatus::Signal(s) => eprintln!("KILN-MAIN-EXIT signal={s}"),
        }
        let agent = self.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_millis(agent.config().exit_linger_ms);
            while Instant::now() < deadline
                && agent.connections.load(Ordering::SeqCst) > 0
                && !agent.is_stopping()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            agent.request_stop(StopRequest {
                kind: StopKind::Guest(ShutdownAction::Poweroff),
                grace: DEFAULT_GRACE,
                reason: format!("the main process ended ({status})"),
            });
        });
    }

    /// Waits for the main process's exit.
    pub fn wait_main(&self) -> Result<ExitStatus, String> {
        let mut state = lock(&self.state);
        loop {
            match state.main {
                MainPhase::None => return Err(self.no_main_reason(state.config.is_some())),
                MainPhase::Exited(s) => return Ok(s),
                _ => state = self.main_cond.wait(state).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}
