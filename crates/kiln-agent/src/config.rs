//! The agent's configuration for a boot. Kiln sends it over the agent channel (`Configure`) once
//! the guest is up; an agent under another init, or in a hand-made guest, can read it from
//! `/etc/kiln/agent.json` instead (see docs/agent.md). Every field is optional; no configuration
//! means no main process (the agent only serves the host).

use std::path::Path;

pub use kiln_agent_proto::{GuestConfig as AgentConfig, PoweroffMethod};

/// Where an agent under another init (or a hand-made guest) finds its configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kiln/agent.json";
/// Largest configuration file accepted.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The fields a config file may have: a typo is an error, not a silently ignored setting.
const KNOWN_FIELDS: &[&str] =
    &["hostname", "main", "poweroff", "exit_linger_ms", "time", "authorized_keys", "nameservers"];

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
    #[error("invalid agent config {path}: unknown field {field:?} (known: {known})")]
    UnknownField { path: String, field: String, known: String },
}

/// Loads a config file; `None` when there is none (the host then sends the configuration).
pub fn load(path: &Path) -> Result<Option<AgentConfig>, ConfigError> {
    use std::io::Read;
    let p = path.display().to_string();
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ConfigError::Read { path: p, source }),
    };
    let mut text = Vec::new();
    f.take(MAX_CONFIG_BYTES)
        .read_to_end(&mut text)
        .map_err(|source| ConfigError::Read { path: p.clone(), source })?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|source| ConfigError::Parse { path: p.clone(), source })?;
    if let Some(field) =
        value.as_object().and_then(|o| o.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())))
    {
        return Err(ConfigError::UnknownField {
            path: p,
            field: field.clone(),
            known: KNOWN_FIELDS.join(", "),
        });
    }
    let cfg: AgentConfig =
        serde_json::from_value(value).map_err(|source| ConfigError::Parse { path: p.clone(), source })?;
    check(&cfg).map_err(|_| ConfigError::EmptyArgv { path: p })?;
    Ok(Some(cfg))
}

/// What every configuration must satisfy, however it arrived.
pub fn check(cfg: &AgentConfig) -> Result<(), String> {
    if cfg.main.as_ref().is_some_and(|m| m.exec.argv.is_empty()) {
        return Err("main.argv is empty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_default_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("none.json")).unwrap().is_none());
        let p = dir.path().join("a.json");
        std::fs::write(&p, r#"{"main": {"argv": ["sh"], "wait_for_attach": true}, "poweroff": "acpi"}"#)
            .unwrap();
        let cfg = load(&p).unwrap().unwrap();
        assert!(cfg.main.unwrap().wait_for_attach);
        assert_eq!(cfg.poweroff, PoweroffMethod::Acpi);
        assert_eq!(cfg.exit_linger_ms, 3000);
        for bad in [r#"{"main": {"argv": []}}"#, r#"{"mian": {}}"#, "{"] {
            std::fs::write(&p, bad).unwrap();
            assert!(load(&p).is_err(), "{bad}");
        }
    }
}
