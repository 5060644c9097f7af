//! The MMDS data store: one JSON document per VM, shared by the API (host side, trusted) and the
//! guest-facing server (read only, plus tokens).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::token::{TokenAuthority, TokenError};

/// Firecracker's default `--mmds-size-limit` (its default `--http-api-max-payload-size`).
pub const DEFAULT_SIZE_LIMIT: usize = 51_200;

/// The store as the API thread and the network devices share it.
pub type SharedMmds = Arc<Mutex<Mmds>>;

/// How the guest must talk to MMDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MmdsVersion {
    /// Plain GETs; tokens are issued but not required.
    #[default]
    V1,
    /// Session tokens: every GET carries a token from `PUT /latest/api/token`.
    V2,
}

/// Why the store refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The document would exceed the size limit.
    #[error(
        "the MMDS data store would be {size} bytes of JSON, more than its limit of {limit} bytes: \
         store less, or start kiln-vmm with a larger --mmds-size-limit"
    )]
    TooLarge { size: usize, limit: usize },
    /// `PATCH /mmds` before any `PUT /mmds`.
    #[error("The MMDS data store is not initialized: PUT /mmds before patching it")]
    NotInitialized,
}

/// Why a guest read found nothing to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetError {
    /// No value at that path (or nothing stored yet).
    NotFound,
    /// The value is neither a string nor an object, which IMDS text cannot express.
    UnsupportedValueType,
}

/// How a guest wants values formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// The JSON value itself.
    Json,
    /// EC2 IMDS text: an object lists its keys (objects with a trailing `/`), a string is
    /// itself.
    Imds,
}

/// Counts bytes written, to size a JSON document without building it.
struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Size of `v` serialised compactly.
pub fn json_size(v: &Value) -> usize {
    let mut c = Counter(0);
    // Writing to a counter cannot fail and a Value always serialises.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Applies an RFC 7396 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The metadata store and the settings the guest-facing server needs.
#[derive(Debug)]
pub struct Mmds {
    data: Option<Value>,
    limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: TokenAuthority,
}

impl Default for Mmds {
    fn default() -> Self {
        Self::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store holding at most `limit` bytes of JSON.
    pub fn new(limit: usize) -> Self {
        Self {
            data: None,
            limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: TokenAuthority::new(),
        }
    }

    pub fn shared(limit: usize) -> SharedMmds {
        Arc::new(Mutex::new(Self::new(limit)))
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    pub fn set_version(&mut self, version: MmdsVersion) {
        self.version = version;
    }

    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// With `true`, guests always get IMDS text, whatever their `Accept` header says.
    pub fn set_imds_compat(&mut self, on: bool) {
        self.imds_compat = on;
    }

    /// Whether anything was ever PUT.
    pub fn is_initialized(&self) -> bool {
        self.data.is_some()
    }

    fn check_size(&self, v: &Value) -> Result<(), StoreError> {
        let size = json_size(v);
        if size > self.limit {
            return Err(StoreError::TooLarge { size, limit: self.limit });
        }
        Ok(())
    }

    /// Replaces the whole document (`PUT /mmds`).
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// Merges `patch` into the document (`PATCH /mmds`); all or nothing.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        let current = self.data.as_ref().ok_or(StoreError::NotInitialized)?;
        let mut next = current.clone();
        merge_patch(&mut next, patch);
        self.check_size(&next)?;
        self.data = Some(next);
        Ok(())
    }

    /// The whole document (`GET /mmds`): `{}` before anything was PUT, as Firecracker answers.
    pub fn document(&self) -> Value {
        match &self.data {
            Some(Value::Null) | None => Value::Object(Map::new()),
            Some(v) => v.clone(),
        }
    }

    /// The value at a guest request path (a JSON pointer; repeated and trailing `/` are
    /// ignored), formatted for the guest.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, GetError> {
        let data = self.data.as_ref().ok_or(GetError::NotFound)?;
        let pointer = normalise_path(path);
        let value = data.pointer(&pointer).ok_or(GetError::NotFound)?;
        match format {
            OutputFormat::Json => Ok(value.to_string()),
            OutputFormat::Imds => format_imds(value),
        }
    }

    /// Issues a V2 session token valid for `ttl_seconds`.
    pub fn generate_token(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        self.tokens.generate(ttl_seconds, now)
    }

    pub fn is_valid_token(&self, token: &str, now: Instant) -> bool {
        self.tokens.is_valid(token, now)
    }
}

/// `/a//b/` → `/a/b`; `/` → `` (the whole document).
pub(crate) fn normalise_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    out
}

fn format_imds(value: &Value) -> Result<String, GetError> {
    match value {
        Value::Object(map) => {
            let keys: Vec<String> =
                map.iter().map(|(k, v)| if v.is_object() { format!("{k}/") } else { k.clone() }).collect();
            Ok(keys.join("\n"))
        }
        Value::String(s) => Ok(s.clone()),
        _ => Err(GetError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> Value {
        json!({"latest": {"meta-data": {"ami-id": "ami-1", "reservation-id": "r-1"}, "user-data": "x"},
               "age": 43, "list": ["a", "b"], "flag": false, "nothing": null})
    }

    #[test]
    fn put_replaces_and_document_reads_back() {
        let mut m = Mmds::default();
        assert_eq!(m.document(), json!({}), "an empty store reads as {{}}");
        assert!(!m.is_initialized());
        m.put(sample()).unwrap();
        assert_eq!(m.document(), sample());
        m.put(json!({"only": "this"})).unwrap();
        assert_eq!(m.document(), json!({"only": "this"}));
    }

    #[test]
    fn patch_is_rfc_7396_merge() {
        let mut m = Mmds::default();
        assert_eq!(m.patch(&json!({"a": 1})), Err(StoreError::NotInitialized));
        m.put(json!({"a": "b", "c": {"d": "e", "f": "g"}})).unwrap();
        m.patch(&json!({"a": "z", "c": {"f": null}})).unwrap();
        assert_eq!(m.document(), json!({"a": "z", "c": {"d": "e"}}));
        // RFC 7396 appendix A examples.
        for (target, patch, result) in [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": "b", "b": "c"}), json!({"a": null}), json!({"b": "c"})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (json!({"a": {"b": "c"}}), json!({"a": {"b": "d", "c": null}}), json!({"a": {"b": "d"}})),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ] {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, result, "{target} + {patch}");
        }
    }

    #[test]
    fn size_limit_applies_to_put_and_patch_atomically() {
        let mut m = Mmds::new(30);
        let ok = json!({"k": "0123456789"});
        m.put(ok.clone()).unwrap();
        let big = json!({"k": "0123456789012345678901234567890"});
        let e = m.put(big.clone()).unwrap_err();
        assert_eq!(e, StoreError::TooLarge { size: json_size(&big), limit: 30 });
        assert!(e.to_string().contains("--mmds-size-limit"), "{e}");
        assert_eq!(m.document(), ok, "a refused PUT changes nothing");
        assert!(matches!(m.patch(&json!({"more": "0123456789012345"})), Err(StoreError::TooLarge { .. })));
        assert_eq!(m.document(), ok, "a refused PATCH changes nothing");
        assert_eq!(json_size(&json!({"a": [1, "x"]})), r#"{"a":[1,"x"]}"#.len());
    }

    #[test]
    fn guest_reads_json_and_imds() {
        let mut m = Mmds::default();
        assert_eq!(m.get("/", OutputFormat::Json), Err(GetError::NotFound), "nothing stored yet");
        m.put(sample()).unwrap();
        assert_eq!(m.get("/latest/meta-data/ami-id", OutputFormat::Json).unwrap(), "\"ami-1\"");
        assert_eq!(m.get("/latest/meta-data/ami-id", OutputFormat::Imds).unwrap(), "ami-1");
        assert_eq!(m.get("/latest", OutputFormat::Imds).unwrap(), "meta-data/\nuser-data");
        assert_eq!(m.get("//latest///meta-data/", OutputFormat::Imds).unwrap(), "ami-id\nreservation-id");
        assert_eq!(m.get("/", OutputFormat::Json).unwrap(), sample().to_string());
        assert_eq!(m.get("/list/1", OutputFormat::Imds).unwrap(), "b");
        assert_eq!(m.get("/age", OutputFormat::Json).unwrap(), "43");
        for p in ["/age", "/list", "/flag", "/nothing"] {
            assert_eq!(m.get(p, OutputFormat::Imds), Err(GetError::UnsupportedValueType), "{p}");
        }
        for p in ["/nope", "/latest/meta-data/ami-id/deeper", "/list/9"] {
            assert_eq!(m.get(p, OutputFormat::Json), Err(GetError::NotFound), "{p}");
        }
    }
}
