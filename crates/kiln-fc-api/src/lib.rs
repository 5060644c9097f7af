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
//!
//! ```no_run
//! use std::sync::Arc;
//! use kiln_fc_api::{ApiClient, ApiRequest, ApiResponse, ApiServer};
//! use kiln_fc_api::models::FirecrackerVersion;
//!
//! // The VMM side: answer each typed request.
//! let handler = Arc::new(|req: ApiRequest| match req {
//!     ApiRequest::GetVersion => ApiResponse::ok(&FirecrackerVersion {
//!         firecracker_version: "1.16.1".into(),
//!     }),
//!     ApiRequest::PutBootSource(_) => ApiResponse::no_content(),
//!     _ => ApiResponse::bad_request("not supported yet"),
//! });
//! let server = ApiServer::bind("/tmp/vm.sock")?.spawn(handler)?;
//!
//! // The CLI side: a typed client over the same socket.
//! let mut client = ApiClient::new("/tmp/vm.sock");
//! println!("{}", client.get_version()?.firecracker_version);
//! server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
