//! Docker-style image references: `busybox`, `busybox:1.36`, `ghcr.io/o/r:tag`,
//! `127.0.0.1:5000/x/y@sha256:...`. Short names mean Docker Hub (`docker.io/library/NAME`), no tag means
//! `latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::ImageError;

/// The registry short names resolve to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a reference names none (and no digest).
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses a reference the way `docker pull` does.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let invalid = |reason| ImageError::InvalidReference { reference: input.to_string(), reason };
        if input.is_empty() {
            return Err(invalid("it is empty"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(Digest::parse(digest)?)),
            None => (input, None),
        };
        // A tag follows the last ':' unless that ':' is part of the registry's port (a '/' after it).
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(invalid)?;
        }
        if name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid("the name is longer than 255 characters"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                validate_registry(first).map_err(invalid)?;
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_string() } else { registry };
        for component in repository.split('/') {
            validate_path_component(component).map_err(invalid)?;
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// The same repository at another tag (used to name imported images).
    pub fn with_tag(&self, tag: &str) -> Result<Self, ImageError> {
        validate_tag(tag)
            .map_err(|reason| ImageError::InvalidReference { reference: tag.to_string(), reason })?;
        Ok(Reference { tag: Some(tag.to_string()), digest: None, ..self.clone() })
    }

    /// The registry as written (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host (and port) the registry API is served on: Docker Hub's API lives at
    /// `registry-1.docker.io`.
    pub fn registry_api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.as_str(),
            (None, Some(t)) => t,
            (None, None) => DEFAULT_TAG,
        }
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form people type: `busybox:latest` for `docker.io/library/busybox:latest`.
    pub fn familiar(&self) -> String {
        let full = self.to_string();
        let stripped = full.strip_prefix("docker.io/").unwrap_or(&full);
        stripped.strip_prefix("library/").unwrap_or(stripped).to_string()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn validate_tag(tag: &str) -> Result<(), &'static str> {
    let mut chars = tag.chars();
    match chars.next() {
        None => return Err("the tag is empty"),
        Some(c) if !(c.is_ascii_alphanumeric() || c == '_') => {
            return Err("a tag starts with a letter, digit or '_'")
        }
        _ => {}
    }
    if tag.len() > MAX_TAG_LEN {
        return Err("the tag is longer than 128 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err("a tag may contain only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn validate_registry(registry: &str) -> Result<(), &'static str> {
    let (host, port) = match registry.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || registry.starts_with('[') => (h, Some(p)),
        _ => (registry, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err() {
            return Err("the registry port must be a number up to 65535");
        }
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    if host_ok {
        Ok(())
    } else {
        Err("the registry host is not a valid host name or address")
    }
}

/// A repository path component: lowercase alphanumerics separated by one `.`, one or two `_`, or any
/// number of `-`.
fn validate_path_component(component: &str) -> Result<(), &'static str> {
    const BAD: &str = "repository names are lowercase letters and digits, separated by '.', '_', '__' or '-'";
    let bytes = component.as_bytes();
    if bytes.is_empty() {
        return Err("a repository path component is empty");
    }
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return Err(BAD);
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(BAD);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = Reference::parse(s).unwrap();
        (
            r.registry().to_string(),
            r.repository().to_string(),
            r.tag().map(str::to_string),
            r.digest().map(|d| d.to_string()),
        )
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn short_names_mean_docker_hub_library_latest() {
        assert_eq!(
            parts("busybox"),
            ("docker.io".into(), "library/busybox".into(), Some("latest".into()), None)
        );
        assert_eq!(Reference::parse("busybox").unwrap().to_string(), "docker.io/library/busybox:latest");
        assert_eq!(parts("busybox:1.36").2.as_deref(), Some("1.36"));
        assert_eq!(parts("someone/tool").1, "someone/tool");
        assert_eq!(parts("index.docker.io/library/busybox").0, "docker.io");
        assert_eq!(Reference::parse("busybox").unwrap().registry_api_host(), "registry-1.docker.io");
    }

    #[test]
    fn registries_with_ports_and_digests() {
        let s = format!("127.0.0.1:5000/x/y@{D}");
        assert_eq!(parts(&s), ("127.0.0.1:5000".into(), "x/y".into(), None, Some(D.into())));
        let r = Reference::parse(&s).unwrap();
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), s);
        let both = format!("localhost:5000/busybox:1.2@{D}");
        assert_eq!(
            parts(&both),
            ("localhost:5000".into(), "busybox".into(), Some("1.2".into()), Some(D.into()))
        );
        assert_eq!(parts("localhost/busybox").0, "localhost");
        assert_eq!(parts("ghcr.io/org/repo/sub:v1-rc.2").1, "org/repo/sub");
        assert_eq!(parts("[::1]:5000/busybox").0, "[::1]:5000");
    }

    #[test]
    fn familiar_form_strips_docker_hub_defaults() {
        assert_eq!(Reference::parse("docker.io/library/busybox:1").unwrap().familiar(), "busybox:1");
        assert_eq!(Reference::parse("127.0.0.1:5/busybox").unwrap().familiar(), "127.0.0.1:5/busybox:latest");
    }

    #[test]
    fn invalid_references_are_refused_with_a_reason() {
        for bad in [
            "",
            "BusyBox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "a/-b",
            "a..b",
            "a___b",
            "busybox@sha256:123",
            "127.0.0.1:99999/x",
            "host:port/x",
            ":tag",
            "bad host/x",
        ] {
            let err = Reference::parse(bad).unwrap_err();
            assert!(
                matches!(err, ImageError::InvalidReference { .. } | ImageError::InvalidDigest { .. }),
                "{bad:?} gave {err}"
            );
        }
        let long = "a".repeat(256);
        assert!(Reference::parse(&long).is_err());
        assert!(Reference::parse(&format!("busybox:{}", "t".repeat(129))).is_err());
    }
}
