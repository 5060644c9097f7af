//! The agent's configuration: `/etc/kiln/agent.json` in the guest, written by the host when it
//! builds the VM's root filesystem (see docs/agent.md). Every field is optional; no file means no
//! main process (the agent only serves the host).

use std::path::Path;

use kiln_agent_proto::ExecRequest;
use serde::Deserialize;

/// Where the host injects the configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kiln/agent.json";
/// Largest configuration file accepted.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Hostname to set (PID 1 only).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The image's entrypoint + cmd and how to run it.
    #[serde(default)]
    pub main: Option<MainConfig>,
    /// How "power off" is done as PID 1 (see [`PoweroffMethod`]).
    #[serde(default)]
    pub poweroff: PoweroffMethod,
    /// After the main process exits, how long the agent waits (while a host is connected) for the
    /// host to collect the exit and send Shutdown before it powers off by itself.
    #[serde(default = "default_linger_ms")]
    pub exit_linger_ms: u64,
}

fn default_linger_ms() -> u64 {
    3000
}

/// The main process: an exec request (`argv`, `env`, `cwd`, `user`; with `wait_for_attach` also
/// `tty` and `stdin`) plus how it starts.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MainConfig {
    #[serde(flatten)]
    pub exec: ExecRequest,
    /// Start only when a host attaches (AttachMain) and stream its stdio there, like `docker run`
    /// in the foreground. Otherwise it starts at boot with stdin /dev/null and its output on the
    /// console.
    #[serde(default)]
    pub wait_for_attach: bool,
}

/// How PID 1 powers the VM off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoweroffMethod {
    /// `reboot(RB_AUTOBOOT)`: a microVM without ACPI power-off (kiln-vmm, Firecracker, QEMU with
    /// `-no-reboot`) ends its VMM on guest reboot (with `reboot=k`/`reboot=t` on the cmdline).
    #[default]
    Reboot,
    /// `reboot(RB_POWER_OFF)`: for machines with ACPI power-off. Without it the kernel only halts.
    Acpi,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid agent config {path}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid agent config {path}: main.argv is empty")]
    EmptyArgv { path: String },
}

impl AgentConfig {
    /// Loads the config; a missing file is the default config.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        use std::io::Read;
        let p = path.display().to_string();
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AgentConfig::default()),
            Err(source) => return Err(ConfigError::Read { path: p, source }),
        };
        let mut text = Vec::new();
        f.take(MAX_CONFIG_BYTES)
            .read_to_end(&mut text)
            .map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        let cfg: AgentConfig =
            serde_json::from_slice(&text).map_err(|source| ConfigError::Parse { path: p.clone(), source })?;
        if cfg.main.as_ref().is_some_and(|m| m.exec.argv.is_empty()) {
            return Err(ConfigError::EmptyArgv { path: p });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_default_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::load(&dir.path().join("none.json")).unwrap();
        assert!(cfg.main.is_none() && cfg.poweroff == PoweroffMethod::Reboot);
        let p = dir.path().join("a.json");
        std::fs::write(&p, r#"{"main": {"argv": ["sh"], "wait_for_attach": true}, "poweroff": "acpi"}"#)
            .unwrap();
        let cfg = AgentConfig::load(&p).unwrap();
        assert!(cfg.main.unwrap().wait_for_attach);
        assert_eq!(cfg.poweroff, PoweroffMethod::Acpi);
        assert_eq!(cfg.exit_linger_ms, 3000);
        for bad in [r#"{"main": {"argv": []}}"#, r#"{"mian": {}}"#, "{"] {
            std::fs::write(&p, bad).unwrap();
            assert!(AgentConfig::load(&p).is_err(), "{bad}");
        }
    }
}
