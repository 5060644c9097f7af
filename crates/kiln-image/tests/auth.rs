//! The registry client against a small in-process registry on 127.0.0.1: Bearer token and Basic
//! authentication, credentials from a Docker config file, manifest lists, and manifests whose bytes
//! do not match the digest the registry announces.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_image::{
    Credentials, DockerConfig, ImageError, ImageStore, NoProgress, Reference, RegistryOptions,
    StaticCredentials,
};
use kiln_test_utils::oci::{sha256_digest, OciLayout, TarBuilder};
use serde_json::json;

struct Request {
    path: String,
    headers: HashMap<String, String>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response { status, headers: Vec::new(), body: body.into() }
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// Serves HTTP/1.1 GETs on a loopback port, one request per connection, until the test ends.
fn serve(handler: Arc<Handler>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let response = handler(&Request { path, headers });
            let mut out = format!(
                "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                response.status,
                response.body.len()
            );
            for (k, v) in &response.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let _ = stream.write_all(out.as_bytes());
            let _ = stream.write_all(&response.body);
        }
    });
    port
}

/// A one-layer image in an oci-layout, served by digest.
struct Content {
    blobs: HashMap<String, Vec<u8>>,
    manifest_digest: String,
    config_digest: String,
}

fn content(dir: &Path) -> Content {
    let mut layout = OciLayout::create(dir);
    let mut layer = TarBuilder::new();
    layer.file("hello", 0o644, b"world");
    let built = layout.add_image(&[layer.finish()], true, json!({"Cmd": ["/hello"]}), "latest");
    let mut blobs = HashMap::new();
    for entry in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        blobs.insert(
            format!("sha256:{}", entry.file_name().to_string_lossy()),
            std::fs::read(entry.path()).unwrap(),
        );
    }
    Content { blobs, manifest_digest: built.manifest_digest, config_digest: built.config_digest }
}

/// Answers registry API paths from `content`; `manifest_digest_header` overrides the announced digest.
fn registry_response(content: &Content, path: &str, manifest_digest_header: Option<&str>) -> Response {
    if path == "/v2/" {
        return Response::new(200, "{}");
    }
    if let Some(reference) = path.strip_prefix("/v2/img/manifests/") {
        let digest =
            if reference == "latest" { content.manifest_digest.clone() } else { reference.to_string() };
        return match content.blobs.get(&digest) {
            Some(body) => Response::new(200, body.clone())
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                .header("Docker-Content-Digest", manifest_digest_header.unwrap_or(&digest)),
            None => Response::new(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
        };
    }
    if let Some(digest) = path.strip_prefix("/v2/img/blobs/") {
        return match content.blobs.get(digest) {
            Some(body) => Response::new(200, body.clone()),
            None => Response::new(404, ""),
        };
    }
    Response::new(404, "")
}

fn pull(port: u16, options: &RegistryOptions) -> Result<kiln_image::ImageSummary, ImageError> {
    let state = tempfile::tempdir().unwrap();
    let images = ImageStore::open(state.path()).unwrap();
    images.pull(&Reference::parse(&format!("127.0.0.1:{port}/img:latest")).unwrap(), options, &NoProgress)
}

fn with_credentials(port: u16, user: &str, password: &str) -> RegistryOptions {
    let mut map = std::collections::BTreeMap::new();
    map.insert(format!("127.0.0.1:{port}"), Credentials { username: user.into(), password: password.into() });
    RegistryOptions { credentials: Arc::new(StaticCredentials(map)), ..Default::default() }
}

#[test]
fn bearer_token_flow_with_basic_credentials_at_the_token_service() {
    let dir = tempfile::tempdir().unwrap();
    let content = Arc::new(content(dir.path()));
    let token_requests = Arc::new(Mutex::new(Vec::new()));
    let port_cell = Arc::new(Mutex::new(0u16));
    let (c, requests, port_for_handler) = (content.clone(), token_requests.clone(), port_cell.clone());
    let port = serve(Arc::new(move |req: &Request| {
        let port = *port_for_handler.lock().unwrap();
        let challenge = format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake-registry""#);
        if req.path.starts_with("/token") {
            requests.lock().unwrap().push(req.path.clone());
            return if req.headers.get("authorization").map(String::as_str) == Some("Basic dXNlcjpwYXNz") {
                Response::new(200, r#"{"token":"tok-123"}"#)
            } else {
                Response::new(401, "bad credentials")
            };
        }
        if req.headers.get("authorization").map(String::as_str) != Some("Bearer tok-123") {
            return Response::new(401, "").header("WWW-Authenticate", &challenge);
        }
        registry_response(&c, &req.path, None)
    }));
    *port_cell.lock().unwrap() = port;

    let summary = pull(port, &with_credentials(port, "user", "pass")).unwrap();
    assert_eq!(summary.id.as_str(), content.config_digest);
    let requests = token_requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("scope=repository%3Aimg%3Apull") && r.contains("service=fake-registry")),
        "{requests:?}"
    );

    let err = pull(port, &RegistryOptions::default()).unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { status: 401, .. }), "{err}");
    let err = pull(port, &with_credentials(port, "user", "wrong")).unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
}

#[test]
fn basic_auth_registry_with_credentials_from_a_docker_config() {
    let dir = tempfile::tempdir().unwrap();
    let content = Arc::new(content(&dir.path().join("layout")));
    let c = content.clone();
    let port = serve(Arc::new(move |req: &Request| {
        if req.headers.get("authorization").map(String::as_str) != Some("Basic dXNlcjpwYXNz") {
            return Response::new(401, "").header("WWW-Authenticate", r#"Basic realm="fake""#);
        }
        registry_response(&c, &req.path, None)
    }));
    let config = dir.path().join("config.json");
    std::fs::write(&config, format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"dXNlcjpwYXNz"}}}}}}"#))
        .unwrap();
    let options =
        RegistryOptions { credentials: Arc::new(DockerConfig::load(&config).unwrap()), ..Default::default() };
    assert_eq!(pull(port, &options).unwrap().id.as_str(), content.config_digest);
    let err = pull(port, &RegistryOptions::default()).unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
}

#[test]
fn a_manifest_that_does_not_match_its_announced_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let content = Arc::new(content(dir.path()));
    let c = content.clone();
    let wrong = sha256_digest(b"something else");
    let port = serve(Arc::new(move |req: &Request| registry_response(&c, &req.path, Some(&wrong))));
    let err = pull(port, &RegistryOptions::default()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn manifest_lists_resolve_to_linux_amd64() {
    let dir = tempfile::tempdir().unwrap();
    let mut content = content(dir.path());
    let manifest_size = content.blobs[&content.manifest_digest].len();
    let index_for = |archs: &[&str]| {
        let manifests: Vec<_> = archs
            .iter()
            .map(|arch| {
                let digest = if *arch == "amd64" { content.manifest_digest.clone() } else { sha256_digest(arch.as_bytes()) };
                json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest_size,
                       "platform": {"os": "linux", "architecture": arch}})
            })
            .collect();
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}))
            .unwrap()
    };
    let multi = index_for(&["arm64", "amd64"]);
    let arm_only = index_for(&["arm64", "s390x"]);
    content.blobs.insert(sha256_digest(&multi), multi.clone());
    let content = Arc::new(content);
    let c = content.clone();
    let port = serve(Arc::new(move |req: &Request| {
        let index = match req.path.as_str() {
            "/v2/img/manifests/latest" => Some(&multi),
            "/v2/img/manifests/armonly" => Some(&arm_only),
            _ => None,
        };
        match index {
            Some(body) => Response::new(200, body.clone())
                .header("Content-Type", "application/vnd.oci.image.index.v1+json")
                .header("Docker-Content-Digest", &sha256_digest(body)),
            None => registry_response(&c, &req.path, None),
        }
    }));
    let summary = pull(port, &RegistryOptions::default()).unwrap();
    assert_eq!(summary.digest.as_str(), content.manifest_digest);

    let state = tempfile::tempdir().unwrap();
    let images = ImageStore::open(state.path()).unwrap();
    let reference = Reference::parse(&format!("127.0.0.1:{port}/img:armonly")).unwrap();
    let err = images.pull(&reference, &RegistryOptions::default(), &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::NoMatchingPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64, linux/s390x"), "{err}");
}

/// Plain HTTP is refused for a registry that is not loopback by name, unless the caller allows it.
/// (0.0.0.0 is not a loopback address, but on Linux connecting to it reaches this host, so the test
/// server on 127.0.0.1 answers and no traffic leaves the machine. With HTTP(S)_PROXY set, 0.0.0.0
/// goes to the proxy like any non-loopback registry and this test fails.)
#[test]
fn plain_http_needs_a_loopback_registry_or_permission() {
    let dir = tempfile::tempdir().unwrap();
    let content = Arc::new(content(dir.path()));
    let c = content.clone();
    let listener_port = serve(Arc::new(move |req: &Request| registry_response(&c, &req.path, None)));
    let state = tempfile::tempdir().unwrap();
    let images = ImageStore::open(state.path()).unwrap();
    let remote = Reference::parse(&format!("0.0.0.0:{listener_port}/img:latest")).unwrap();
    let err = images.pull(&remote, &RegistryOptions::default(), &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::InsecureRegistry { .. }), "{err}");
    assert!(err.to_string().contains("--insecure-registry"), "{err}");
    let allowed = RegistryOptions {
        insecure_registries: vec![format!("0.0.0.0:{listener_port}")],
        ..Default::default()
    };
    let summary = images.pull(&remote, &allowed, &NoProgress).unwrap();
    assert_eq!(summary.id.as_str(), content.config_digest);
}
