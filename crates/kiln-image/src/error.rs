//! The one error type of this crate. Every variant says what was wrong and, where the user can act, what
//! to do; `#[source]` errors are never repeated in the message (the CLI prints the whole chain once).

use std::path::PathBuf;

use crate::digest::Digest;

/// Everything that can go wrong with images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: &'static str },

    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: &'static str },

    #[error(
        "registry {registry} is reachable only over plain HTTP, which is allowed for loopback registries only; \
         pass it as an insecure registry (--insecure-registry {registry}) if you trust the network"
    )]
    InsecureRegistry { registry: String },

    #[error(
        "the TLS certificate of {registry} is not trusted ({detail}{}); put the registry's CA certificate in \
         {}/{registry}/ca.crt, or pass --insecure-registry {registry} to skip verification",
        if registry_files.is_empty() { String::new() } else { format!("; also trusted: {registry_files}") },
        certs_dir.display()
    )]
    UntrustedCertificate { registry: String, detail: String, certs_dir: PathBuf, registry_files: String },

    #[error(
        "registry {registry} refused the TLS connection: it wants a client certificate it trusts (alert \
         {alert}; sent: {}); put the certificate and key it expects in {}/{registry}/client.cert and \
         client.key",
        client_files.as_deref().unwrap_or("none"),
        certs_dir.display()
    )]
    ClientCertificateRefused {
        registry: String,
        alert: String,
        certs_dir: PathBuf,
        client_files: Option<String>,
    },

    #[error("cannot use certificate file {path}: {detail}; fix or remove it")]
    BadCertificateFile { path: PathBuf, detail: String },

    #[error("cannot reach registry {registry} ({url}); check the address and that it is running")]
    RegistryUnreachable {
        registry: String,
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },

    #[error("image {reference} not found in registry {registry}; check the name and tag")]
    NotFound { reference: String, registry: String },

    #[error(
        "registry {registry} refused access to {reference} (HTTP {status}); check the credentials \
         (~/.docker/config.json or the ones given to kiln) and the repository name"
    )]
    Unauthorized { reference: String, registry: String, status: u16 },

    #[error("registry {registry} answered {what} with HTTP {status}: {body}")]
    RegistryStatus { registry: String, what: String, status: u16, body: String },

    #[error("registry {registry}: bad authentication challenge {challenge:?}: {reason}")]
    BadChallenge { registry: String, challenge: String, reason: &'static str },

    #[error(
        "digest mismatch for {what} from {source_name}: expected {expected}, got {actual}; the blob was \
         discarded, nothing was stored (a corrupt or tampered registry or file)"
    )]
    DigestMismatch { what: String, source_name: String, expected: Digest, actual: Digest },

    #[error(
        "size mismatch for {what} from {source_name}: expected {expected} bytes, got {actual}{}; the blob \
         was discarded, nothing was stored",
        if *actual > *expected { " or more" } else { "" }
    )]
    SizeMismatch { what: String, source_name: String, expected: u64, actual: u64 },

    #[error("{what} is larger than the {limit}-byte limit for its kind; refusing to read it")]
    TooLarge { what: String, limit: u64 },

    #[error("unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },

    #[error("malformed {what}: {detail}")]
    Malformed { what: String, detail: String },

    #[error("no image in {what} matches platform {platform}; available: {available}")]
    NoMatchingPlatform { what: String, platform: String, available: String },

    #[error("no image named {name:?} in the local store; see `kiln image ls` or pull it first")]
    UnknownImage { name: String },

    #[error("{name:?} matches more than one image ({candidates}); use a longer ID or the full name")]
    AmbiguousImage { name: String, candidates: String },

    #[error(
        "layer {layer} entry {entry:?} refused: {reason}; the layer tries to write outside the root \
         filesystem or is malformed, so the image cannot be used"
    )]
    UnsafeEntry { layer: String, entry: String, reason: String },

    #[error("{what} contains no kernel (looked for {candidates})")]
    NoKernel { what: String, candidates: String },

    #[error("`{command}` failed ({status}): {stderr}; is e2fsprogs installed (scripts/install-deps)?")]
    ToolFailed { command: String, status: String, stderr: String },

    #[error("cannot run `{command}`; install it (scripts/install-deps installs e2fsprogs)")]
    ToolMissing {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("reading from registry {registry} ({what})")]
    Transfer {
        registry: String,
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} is not valid JSON of the expected shape")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the action and the path it happened on.
pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { action, path, source }
}

/// Wraps a JSON error with a description of what was parsed.
pub(crate) fn json_err(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Json { what, source }
}
