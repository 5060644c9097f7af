//! Kiln's Firecracker-compatible API.
//!
//! Owns: the Firecracker wire types ([`models`], written from
//! `shared/anchors/firecracker-api.yaml`), the `--config-file` parser
//! ([`models::parse_config_file`]), `fault_message` errors, request routing ([`routing`]),
//! HTTP/1.1 over a Unix socket on the server side ([`server`], on the small [`http`] layer), and
//! a typed blocking client ([`client`]) that drives kiln-vmm or a real Firecracker binary.
//!
//! Must not: know about KVM, guest memory or devices. A request is parsed into a typed
//! [`ApiRequest`] and handed to whoever implements [`ApiHandler`] (the VMM); what it means for a
//! VM is the VMM's business. No async runtime: plain threads and blocking sockets.

pub mod client;
pub mod http;
pub mod models;
pub mod routing;
pub mod server;

pub use client::{ApiClient, ClientError};
pub use http::{Method, StatusCode};
pub use models::{load_config_file, parse_config_file, ConfigError, FullVmConfiguration, LoadConfigError};
pub use routing::{parse_request, ApiHandler, ApiRequest, ApiResponse, RequestError};
pub use server::{serve_connection, ApiServer, ServerConfig, ServerError, ServerHandle};
