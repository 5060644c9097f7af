//! The VMM's log: `tracing` events as text lines on stderr or in a file or named pipe, configured
//! at start (`--level`, `--log-path`, `--show-level`, `--show-log-origin`, `--module`, the config
//! file's `logger`) and changed while running (`PUT /logger`) through tracing-subscriber's reload
//! layers. Settings follow Firecracker's logger: a level (default Info), whether lines show their
//! level and their origin (file:line), and an optional module filter (only events from that module
//! path and below). Writes never block: a full log pipe loses lines, counted as
//! `logger.missed_log_count` in the metrics.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use kiln_devices::bus::lock;
use kiln_fc_api::models::{LogLevel, Logger};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::metrics::METRICS;

/// What the log looks like and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogSettings {
    pub level: LogLevel,
    /// `None`: stderr.
    pub path: Option<PathBuf>,
    pub show_level: bool,
    pub show_origin: bool,
    /// Only events whose module path starts with this.
    pub module: Option<String>,
}

impl LogSettings {
    /// Applies the fields `change` sets; the others stay (Firecracker's `PUT /logger`).
    pub fn apply(&mut self, change: &Logger) {
        if let Some(l) = change.level {
            self.level = l;
        }
        if let Some(p) = &change.log_path {
            self.path = Some(p.clone());
        }
        if let Some(b) = change.show_level {
            self.show_level = b;
        }
        if let Some(b) = change.show_log_origin {
            self.show_origin = b;
        }
        if let Some(m) = &change.module {
            self.module = Some(m.clone()).filter(|m| !m.is_empty());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open the log destination {path}: {source}; create the file or named pipe (mkfifo) first and check its permissions")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid logger module filter '{module}': use a module path such as kiln_vmm::api ({why})")]
    Module { module: String, why: String },
    #[error("cannot set up logging: {0}")]
    Init(String),
    #[error("the logger was not set up by this process, so it cannot be changed")]
    NotInitialized,
}

fn filter_for(s: &LogSettings) -> Result<EnvFilter, LoggerError> {
    let level = match s.level {
        LogLevel::Off => "off",
        LogLevel::Error => "error",
        LogLevel::Warning => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    let directives = match &s.module {
        Some(m) => {
            if m.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                return Err(LoggerError::Module {
                    module: m.clone(),
                    why: "only letters, digits, '_' and '::' are allowed".into(),
                });
            }
            format!("off,{m}={level}")
        }
        None => level.to_string(),
    };
    EnvFilter::try_new(&directives)
        .map_err(|e| LoggerError::Module { module: s.module.clone().unwrap_or_default(), why: e.to_string() })
}

/// One log line's writer: stderr, or the shared destination file (never blocking).
struct LineWriter(Option<Arc<Mutex<File>>>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(file) = &self.0 else { return io::stderr().write(buf) };
        match lock(file).write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                METRICS.logger.missed_log_count.inc();
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type FilterLayer = reload::Layer<EnvFilter, Registry>;
type Inner = Layered<FilterLayer, Registry>;
type FmtLayer = Box<dyn Layer<Inner> + Send + Sync>;

fn fmt_layer(s: &LogSettings) -> Result<FmtLayer, LoggerError> {
    let dest = match &s.path {
        Some(p) => {
            let (file, _fifo) =
                crate::output::open(p).map_err(|source| LoggerError::Open { path: p.clone(), source })?;
            Some(Arc::new(Mutex::new(file)))
        }
        None => None,
    };
    Ok(tracing_subscriber::fmt::layer()
        .with_writer(move || LineWriter(dest.clone()))
        .with_level(s.show_level)
        .with_file(s.show_origin)
        .with_line_number(s.show_origin)
        .with_target(false)
        .with_ansi(false)
        .boxed())
}

struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    fmt: reload::Handle<FmtLayer, Inner>,
    settings: Mutex<LogSettings>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Sets up the process's log (once).
pub fn init(settings: LogSettings) -> Result<(), LoggerError> {
    let (filter, filter_handle) = reload::Layer::new(filter_for(&settings)?);
    let (fmt, fmt_handle) = reload::Layer::new(fmt_layer(&settings)?);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| LoggerError::Init(e.to_string()))?;
    HANDLES
        .set(Handles { filter: filter_handle, fmt: fmt_handle, settings: Mutex::new(settings) })
        .map_err(|_| LoggerError::Init("the logger is already set up".into()))
}

/// Applies `change` to the running log. Nothing changes when the new settings are invalid (a path
/// that cannot be opened, a bad module filter).
pub fn update(change: &Logger) -> Result<(), LoggerError> {
    let handles = HANDLES.get().ok_or(LoggerError::NotInitialized)?;
    let mut current = lock(&handles.settings);
    let mut next = current.clone();
    next.apply(change);
    let filter = filter_for(&next)?;
    let fmt = fmt_layer(&next)?;
    handles.fmt.reload(fmt).map_err(|e| LoggerError::Init(e.to_string()))?;
    handles.filter.reload(filter).map_err(|e| LoggerError::Init(e.to_string()))?;
    *current = next;
    Ok(())
}

/// The settings in force.
pub fn current() -> Option<LogSettings> {
    HANDLES.get().map(|h| lock(&h.settings).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_changes_only_the_fields_given() {
        let mut s = LogSettings { show_level: true, ..Default::default() };
        s.apply(&Logger { level: Some(LogLevel::Debug), ..Default::default() });
        assert_eq!((s.level, s.show_level, s.path.as_ref()), (LogLevel::Debug, true, None));
        s.apply(&Logger {
            log_path: Some("/tmp/x".into()),
            show_level: Some(false),
            module: Some("kiln_vmm::api".into()),
            ..Default::default()
        });
        assert_eq!(s.path.as_deref(), Some(std::path::Path::new("/tmp/x")));
        assert!(!s.show_level);
        assert_eq!(s.level, LogLevel::Debug);
        s.apply(&Logger { module: Some(String::new()), ..Default::default() });
        assert_eq!(s.module, None, "an empty module clears the filter");
    }

    #[test]
    fn module_filters_are_checked() {
        let with = |m: &str| LogSettings { module: Some(m.into()), ..Default::default() };
        assert!(filter_for(&with("kiln_vmm::api")).is_ok());
        for bad in ["a=b", "x,y", "a b", "[span]"] {
            let e = filter_for(&with(bad)).unwrap_err();
            assert!(e.to_string().contains("module"), "{bad}: {e}");
        }
    }
}
