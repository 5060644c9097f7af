//! Registry authentication: `WWW-Authenticate` challenges (Bearer token and Basic), and where
//! credentials come from (the caller, or `~/.docker/config.json`'s `auths`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{io_err, json_err, ImageError, Result};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` header value.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// Where credentials for a registry come from. `registry` is as written in the reference
/// (`docker.io`, `127.0.0.1:5000`).
pub trait CredentialSource: Send + Sync {
    fn credentials(&self, registry: &str) -> Option<Credentials>;
}

/// No credentials: anonymous pulls only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Anonymous;

impl CredentialSource for Anonymous {
    fn credentials(&self, _: &str) -> Option<Credentials> {
        None
    }
}

/// Credentials given by the caller, by registry.
#[derive(Clone, Debug, Default)]
pub struct StaticCredentials(pub BTreeMap<String, Credentials>);

impl CredentialSource for StaticCredentials {
    fn credentials(&self, registry: &str) -> Option<Credentials> {
        self.0.get(registry).cloned()
    }
}

/// The caller's credentials first, then the Docker config file's.
pub struct Chain(pub Vec<Box<dyn CredentialSource>>);

impl CredentialSource for Chain {
    fn credentials(&self, registry: &str) -> Option<Credentials> {
        self.0.iter().find_map(|s| s.credentials(registry))
    }
}

/// Credentials from a Docker client config file's `auths` (as written by `docker login` /
/// `skopeo login --authfile`). Credential helpers (`credsStore`, `credHelpers`) are not run.
#[derive(Clone, Debug, Default)]
pub struct DockerConfig {
    auths: BTreeMap<String, Credentials>,
}

impl DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
    }

    /// Loads the default file; a missing file means no credentials.
    pub fn load_default() -> Result<Self> {
        match Self::default_path() {
            Some(p) if p.exists() => Self::load(&p),
            _ => Ok(Self::default()),
        }
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err("reading Docker config", path))?;
        Self::parse(&bytes, &path.display().to_string())
    }

    fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
            #[serde(default, rename = "credsStore")]
            creds_store: Option<String>,
        }
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let file: File = serde_json::from_slice(bytes).map_err(json_err(format!("Docker config {what}")))?;
        if let Some(store) = file.creds_store {
            tracing::warn!("{what}: credsStore {store:?} is not supported; only inline auths are used");
        }
        let mut auths = BTreeMap::new();
        for (key, entry) in file.auths {
            let creds = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).ok();
                    let text = decoded.and_then(|d| String::from_utf8(d).ok());
                    match text.as_deref().and_then(|t| t.split_once(':')) {
                        Some((u, p)) => Credentials { username: u.to_string(), password: p.to_string() },
                        None => {
                            return Err(ImageError::Malformed {
                                what: format!("Docker config {what}"),
                                detail: format!("auths[{key:?}].auth is not base64 of USER:PASSWORD"),
                            })
                        }
                    }
                }
                (_, Some(username), Some(password)) => Credentials { username, password },
                _ => continue,
            };
            auths.insert(normalize_config_key(&key), creds);
        }
        Ok(DockerConfig { auths })
    }
}

/// Docker config keys are `https://index.docker.io/v1/`, `host:port`, or URLs; reduce to the registry
/// as written in references.
fn normalize_config_key(key: &str) -> String {
    let no_scheme = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = no_scheme.split('/').next().unwrap_or(no_scheme);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

impl CredentialSource for DockerConfig {
    fn credentials(&self, registry: &str) -> Option<Credentials> {
        self.auths.get(registry).cloned()
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses the first Bearer or Basic challenge of a `WWW-Authenticate` header.
pub fn parse_challenge(header: &str) -> std::result::Result<Challenge, &'static str> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("only Bearer and Basic authentication are supported");
    }
    let params = parse_params(rest)?;
    let realm = params.get("realm").cloned().ok_or("the Bearer challenge has no realm")?;
    Ok(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="quoted, value",key2=token` → map (keys lowercased).
fn parse_params(s: &str) -> std::result::Result<BTreeMap<String, String>, &'static str> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String =
            chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err("a challenge parameter has no name");
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err("a quoted challenge parameter is not closed");
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        out.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_style_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            }
        );
        assert_eq!(parse_challenge(r#"Basic realm="basic-realm""#).unwrap(), Challenge::Basic);
        assert_eq!(
            parse_challenge("bearer realm=http://127.0.0.1:1/t , service=x").unwrap(),
            Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some("x".into()),
                scope: None
            }
        );
        assert!(parse_challenge("Negotiate abc").is_err());
        assert!(parse_challenge(r#"Bearer service="x""#).is_err());
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_err());
    }

    #[test]
    fn docker_config_auths_are_read_and_keys_normalised() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "127.0.0.1:5000":{"username":"a","password":"b:c"},
            "https://ghcr.io":{"auth":""}
        }}"#;
        let cfg = DockerConfig::parse(json, "test").unwrap();
        assert_eq!(cfg.credentials("docker.io").unwrap().password, "pass");
        assert_eq!(cfg.credentials("127.0.0.1:5000").unwrap().password, "b:c");
        assert!(cfg.credentials("ghcr.io").is_none());
        assert!(DockerConfig::parse(br#"{"auths":{"x":{"auth":"!!!"}}}"#, "t").is_err());
        let basic = Credentials { username: "user".into(), password: "pass".into() }.basic_header();
        assert_eq!(basic, "Basic dXNlcjpwYXNz");
    }
}
