//! A blocking client for the OCI distribution (Docker registry v2) API: ping and authenticate (Bearer
//! token or Basic), fetch manifests (verified against the digest asked for or announced), and stream
//! blobs. HTTPS always, trusting the system CA bundle and the registry's own CAs (`tls`, Docker's
//! `certs.d` layout); plain HTTP only for loopback registries or registries the caller allows, which
//! may also use HTTPS with a certificate nobody vouches for (as with Docker's insecure registries).

pub mod auth;
pub mod tls;

use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ureq::http::{Response, StatusCode};
use ureq::tls::TlsConfig;
use ureq::Body;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::oci::{self, MAX_MANIFEST_BYTES};
use crate::reference::Reference;
use auth::{parse_challenge, Anonymous, Challenge, CredentialSource, Credentials};
use tls::{CertificateProblem, RegistryTls};

/// How to talk to registries.
#[derive(Clone)]
pub struct RegistryOptions {
    /// Registries (as written in references, `host:port`) that may be reached over plain HTTP.
    /// Loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) always may. Listed ones may also
    /// serve HTTPS with an untrusted certificate (verification is skipped for them, as Docker does).
    pub insecure_registries: Vec<String>,
    /// Directories of per-registry certificates, searched in order: `<dir>/<host[:port]>/*.crt` are
    /// CAs trusted for that registry (on top of the system bundle), `*.cert` + `*.key` a client
    /// certificate. Default: `tls::DEFAULT_CERTS_DIRS` (`/etc/kiln/certs.d`, `/etc/docker/certs.d`).
    pub certs_dirs: Vec<PathBuf>,
    /// Where credentials come from (`DockerConfig::load_default()` for the user's `docker login`s).
    pub credentials: Arc<dyn CredentialSource>,
    /// Platform chosen from multi-platform images.
    pub os: String,
    pub architecture: String,
    /// Layers downloaded at the same time.
    pub parallel_downloads: usize,
    /// Time allowed to connect (and for each read to make progress).
    pub timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure_registries: Vec::new(),
            certs_dirs: tls::DEFAULT_CERTS_DIRS.iter().map(PathBuf::from).collect(),
            credentials: Arc::new(Anonymous),
            os: oci::DEFAULT_OS.to_string(),
            architecture: oci::DEFAULT_ARCH.to_string(),
            parallel_downloads: 3,
            timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("insecure_registries", &self.insecure_registries)
            .field("certs_dirs", &self.certs_dirs)
            .field("platform", &format!("{}/{}", self.os, self.architecture))
            .field("parallel_downloads", &self.parallel_downloads)
            .finish_non_exhaustive()
    }
}

/// True for `localhost` and loopback addresses (with or without a port).
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A connection to one repository of one registry (authenticated for pulling from it).
pub struct RegistryClient {
    registry: String,
    repository: String,
    base_url: String,
    agent: ureq::Agent,
    /// Also used for the token service, which Docker reaches with the registry's TLS setup too.
    tls: TlsConfig,
    plain_http_allowed: bool,
    credentials: Option<Credentials>,
    authorization: Mutex<Option<String>>,
}

/// A manifest or index as fetched: its bytes, declared media type and verified digest.
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: Option<String>,
    pub digest: Digest,
}

impl RegistryClient {
    /// Finds the registry's API (HTTPS, or HTTP where allowed) and authenticates for pulling from the
    /// reference's repository. The registry's certificates are read here, once.
    pub fn connect(reference: &Reference, options: &RegistryOptions) -> Result<Self> {
        let registry = reference.registry().to_string();
        let host = reference.registry_api_host();
        let listed_insecure = options.insecure_registries.iter().any(|r| r == &registry || r == host);
        let plain_http_allowed = is_loopback_registry(host) || listed_insecure;
        let tls = tls::registry_tls(&options.certs_dirs, &[registry.as_str(), host])?;
        let make = |scheme: &str, tls: TlsConfig| RegistryClient {
            registry: registry.clone(),
            repository: reference.repository().to_string(),
            base_url: format!("{scheme}://{host}"),
            agent: agent(options.timeout, scheme == "https", is_loopback_registry(host), &tls),
            tls,
            plain_http_allowed,
            credentials: options.credentials.credentials(&registry),
            authorization: Mutex::new(None),
        };
        let https = make("https", tls.config(true));
        let https_error = match https.ping() {
            Ok(()) => return Ok(https),
            Err(ImageError::RegistryUnreachable { source, .. }) => source,
            Err(other) => return Err(other),
        };
        // A TLS server with a certificate problem is no reason to try plain HTTP on the same port.
        match tls::certificate_problem(&https_error) {
            Some(CertificateProblem::Untrusted(detail)) if listed_insecure => {
                tracing::warn!(
                    "the TLS certificate of {registry} is not trusted ({detail}); using it unverified, \
                     as {registry} is an insecure registry"
                );
                let unverified = make("https", tls.config(false));
                unverified.ping()?;
                return Ok(unverified);
            }
            Some(CertificateProblem::Untrusted(detail)) => {
                return Err(untrusted_certificate(&registry, detail, options, &tls))
            }
            Some(CertificateProblem::ClientRefused(alert)) => {
                return Err(ImageError::ClientCertificateRefused {
                    certs_dir: first_certs_dir(options),
                    client_files: tls
                        .client_files
                        .as_ref()
                        .map(|(cert, key)| format!("{} and {}", cert.display(), key.display())),
                    registry,
                    alert,
                })
            }
            None => {}
        }
        tracing::debug!(
            "HTTPS to {registry} failed ({https_error}); plain HTTP allowed: {plain_http_allowed}"
        );
        let http = make("http", tls.config(true));
        match http.ping() {
            Ok(()) if plain_http_allowed => Ok(http),
            Ok(()) => Err(ImageError::InsecureRegistry { registry }),
            Err(ImageError::RegistryUnreachable { .. }) if !plain_http_allowed => {
                Err(ImageError::RegistryUnreachable { registry, url: https.url("/v2/"), source: https_error })
            }
            Err(other) => Err(other),
        }
    }

    /// `https://host` or `http://host`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn unreachable(&self, url: &str) -> impl FnOnce(ureq::Error) -> ImageError {
        let (registry, url) = (self.registry.clone(), url.to_string());
        move |source| ImageError::RegistryUnreachable { registry, url, source: Box::new(source) }
    }

    /// `GET /v2/`: checks this is a registry and takes its authentication challenge up front.
    fn ping(&self) -> Result<()> {
        let url = self.url("/v2/");
        let response = self.agent.get(&url).call().map_err(self.unreachable(&url))?;
        match response.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED => self.answer_challenge(&response, "/v2/"),
            status => Err(self.status_error(response, status, "the API version check (GET /v2/)")),
        }
    }

    /// GET with the current authorization; on 401 answers the challenge and retries once. Returns the
    /// response whatever its status.
    fn get(&self, path: &str, accept: Option<&str>) -> Result<Response<Body>> {
        let response = self.send(path, accept)?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        self.answer_challenge(&response, path)?;
        self.send(path, accept)
    }

    fn send(&self, path: &str, accept: Option<&str>) -> Result<Response<Body>> {
        let url = self.url(path);
        let mut request = self.agent.get(&url);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(authorization) = self.authorization.lock().ok().and_then(|a| a.clone()) {
            request = request.header("Authorization", authorization);
        }
        request.call().map_err(self.unreachable(&url))
    }

    fn answer_challenge(&self, response: &Response<Body>, what: &str) -> Result<()> {
        let header = response.headers().get("www-authenticate").and_then(|h| h.to_str().ok()).unwrap_or("");
        let bad = |reason| ImageError::BadChallenge {
            registry: self.registry.clone(),
            challenge: header.to_string(),
            reason,
        };
        if header.is_empty() {
            return Err(ImageError::Unauthorized {
                reference: format!("{}/{}", self.registry, self.repository),
                registry: self.registry.clone(),
                status: 401,
            });
        }
        let authorization = match parse_challenge(header).map_err(bad)? {
            Challenge::Basic => match &self.credentials {
                Some(c) => c.basic_header(),
                None => {
                    return Err(ImageError::Unauthorized {
                        reference: format!("{}/{} ({what})", self.registry, self.repository),
                        registry: self.registry.clone(),
                        status: 401,
                    })
                }
            },
            Challenge::Bearer { realm, service, scope } => {
                let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                format!("Bearer {}", self.fetch_token(&realm, service.as_deref(), &scope, header)?)
            }
        };
        if let Ok(mut slot) = self.authorization.lock() {
            *slot = Some(authorization);
        }
        Ok(())
    }

    /// Asks the token service named by a Bearer challenge for a pull token.
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        challenge: &str,
    ) -> Result<String> {
        let realm_host = realm
            .strip_prefix("https://")
            .or_else(|| realm.strip_prefix("http://"))
            .map(|rest| rest.split(['/', '?']).next().unwrap_or(""))
            .ok_or_else(|| ImageError::BadChallenge {
                registry: self.registry.clone(),
                challenge: challenge.to_string(),
                reason: "the token realm is not an http(s) URL",
            })?;
        if realm.starts_with("http://") && !(self.plain_http_allowed || is_loopback_registry(realm_host)) {
            return Err(ImageError::InsecureRegistry { registry: realm_host.to_string() });
        }
        let token_agent = agent(
            Duration::from_secs(30),
            realm.starts_with("https://"),
            is_loopback_registry(realm_host),
            &self.tls,
        );
        let mut request = token_agent.get(realm).query("scope", scope);
        if let Some(service) = service {
            request = request.query("service", service);
        }
        if let Some(credentials) = &self.credentials {
            request = request.header("Authorization", credentials.basic_header());
        }
        let response = request.call().map_err(self.unreachable(realm))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ImageError::Unauthorized {
                reference: format!("{}/{}", self.registry, self.repository),
                registry: self.registry.clone(),
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(self.status_error(response, status, "the token request"));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let bytes = read_limited(response, 1 << 20, "token response", &self.registry)?;
        let parsed: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(crate::error::json_err(format!("token response from {realm}")))?;
        parsed.token.or(parsed.access_token).filter(|t| !t.is_empty()).ok_or_else(|| ImageError::Malformed {
            what: format!("token response from {realm}"),
            detail: "it has neither `token` nor `access_token`".into(),
        })
    }

    fn status_error(&self, response: Response<Body>, status: StatusCode, what: &str) -> ImageError {
        let body = read_limited(response, 4096, what, &self.registry).unwrap_or_default();
        let body = String::from_utf8_lossy(&body).chars().take(300).collect::<String>().trim().to_string();
        ImageError::RegistryStatus {
            registry: self.registry.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            body,
        }
    }

    /// Fetches a manifest or index by tag or digest. When asked by digest, the bytes must hash to it;
    /// when asked by tag, to the `Docker-Content-Digest` the registry announces (if any).
    pub fn fetch_manifest(&self, reference: &str, shown_as: &str) -> Result<FetchedManifest> {
        let path = format!("/v2/{}/manifests/{reference}", self.repository);
        let response = self.get(&path, Some(MANIFEST_ACCEPT))?;
        let status = response.status();
        match status {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => {
                return Err(ImageError::NotFound {
                    reference: shown_as.to_string(),
                    registry: self.registry.clone(),
                })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(ImageError::Unauthorized {
                    reference: shown_as.to_string(),
                    registry: self.registry.clone(),
                    status: status.as_u16(),
                })
            }
            _ => return Err(self.status_error(response, status, &format!("manifest {shown_as}"))),
        }
        let header =
            |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let media_type = header("content-type").map(|m| m.split(';').next().unwrap_or("").trim().to_string());
        let announced = header("docker-content-digest");
        let what = format!("manifest {shown_as}");
        let bytes = read_limited(response, MAX_MANIFEST_BYTES, &what, &self.registry)?;
        let digest = Digest::of(&bytes);
        let expected = match Digest::parse(reference) {
            Ok(asked) => Some(asked),
            Err(_) => announced.as_deref().and_then(|a| Digest::parse(a).ok()),
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    what,
                    source_name: format!("registry {}", self.registry),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok(FetchedManifest { bytes, media_type, digest })
    }

    /// Starts downloading a blob; the caller verifies what it reads (see `Store::ingest`).
    pub fn fetch_blob(&self, digest: &Digest, what: &str) -> Result<impl Read + Send + 'static> {
        let path = format!("/v2/{}/blobs/{digest}", self.repository);
        let response = self.get(&path, None)?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_error(response, status, what));
        }
        Ok(response.into_body().into_reader())
    }

    /// The registry, as written in references.
    pub fn registry(&self) -> &str {
        &self.registry
    }
}

fn first_certs_dir(options: &RegistryOptions) -> PathBuf {
    options.certs_dirs.first().cloned().unwrap_or_else(|| PathBuf::from(tls::DEFAULT_CERTS_DIRS[0]))
}

fn untrusted_certificate(
    registry: &str,
    detail: String,
    options: &RegistryOptions,
    tls: &RegistryTls,
) -> ImageError {
    let files: Vec<String> = tls.ca_files.iter().map(|f| f.display().to_string()).collect();
    ImageError::UntrustedCertificate {
        registry: registry.to_string(),
        detail,
        certs_dir: first_certs_dir(options),
        registry_files: files.join(", "),
    }
}

/// An HTTP agent with the registry's TLS setup; proxies from the environment (`HTTPS_PROXY`, ...) are
/// used except for loopback hosts, which a proxy could not reach.
fn agent(timeout: Duration, https_only: bool, loopback: bool, tls: &TlsConfig) -> ureq::Agent {
    let builder = ureq::Agent::config_builder();
    let builder = if loopback { builder.proxy(None) } else { builder };
    builder
        .tls_config(tls.clone())
        .http_status_as_error(false)
        .https_only(https_only)
        .timeout_connect(Some(timeout))
        .timeout_per_read(Some(timeout * 2))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// Reads at most `limit` bytes of a response body; more is an error, not a truncation.
fn read_limited(response: Response<Body>, limit: u64, what: &str, registry: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    response.into_body().into_reader().take(limit + 1).read_to_end(&mut bytes).map_err(|source| {
        ImageError::Transfer { registry: registry.to_string(), what: what.to_string(), source }
    })?;
    if bytes.len() as u64 > limit {
        return Err(ImageError::TooLarge { what: format!("{what} from {registry}"), limit });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for r in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in ["docker.io", "10.0.0.1:5000", "[2001:db8::1]:5000", "localhost.example.com"] {
            assert!(!is_loopback_registry(r), "{r}");
        }
    }
}
