//! The API server: HTTP/1.1 over a Unix socket, one thread per connection.
//!
//! Each connection reads requests in order (keep-alive and pipelining work), routes them with
//! [`parse_request`], hands them to the [`ApiHandler`] and writes the answer. A request that is
//! not valid HTTP, or whose `Content-Length` exceeds the payload limit (51,200 bytes by
//! default, Firecracker's `--http-api-max-payload-size`), gets a 400 with a `fault_message` and
//! the connection is closed, since the rest of its byte stream can no longer be trusted. A
//! request that is valid HTTP but not a valid API call gets a 400 and the connection stays open.
//! Nothing a client sends, and no way it disconnects, ends the server.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::http::{write_response, HttpError, RequestReader, StatusCode};
use crate::models::ApiError;
use crate::routing::{parse_request, ApiHandler, ApiResponse};

/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 51_200;

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted request body; larger `Content-Length`s get a 400.
    pub max_payload_size: usize,
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
    /// Close a connection that sends nothing for this long (`None`: never, as Firecracker).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { max_payload_size: DEFAULT_MAX_PAYLOAD_SIZE, max_connections: 16, idle_timeout: None }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the socket failed (it may already exist: remove stale sockets first).
    #[error("failed to bind the API socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Accepting connections failed.
    #[error("failed to accept an API connection")]
    Accept(#[source] io::Error),
    /// Spawning a thread failed.
    #[error("failed to spawn an API server thread")]
    Spawn(#[source] io::Error),
}

/// A bound, not yet running API server.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: Option<PathBuf>,
    config: ServerConfig,
}

impl ApiServer {
    /// Binds `path` (which must not exist).
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ServerError> {
        let path = path.as_ref().to_path_buf();
        let listener =
            UnixListener::bind(&path).map_err(|source| ServerError::Bind { path: path.clone(), source })?;
        Ok(Self { listener, path: Some(path), config: ServerConfig::default() })
    }

    /// Serves an already bound listener (e.g. one inherited from a jailer).
    pub fn from_listener(listener: UnixListener) -> Self {
        let path = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
        Self { listener, path, config: ServerConfig::default() }
    }

    /// Replaces the limits.
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// The socket path, when the listener has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Serves until the process ends, on the calling thread.
    pub fn run<H: ApiHandler + ?Sized + 'static>(self, handler: Arc<H>) -> Result<(), ServerError> {
        self.accept_loop(handler, Arc::new(AtomicBool::new(false)))
    }

    /// Serves on a background thread; the handle stops it.
    pub fn spawn<H: ApiHandler + ?Sized + 'static>(
        self,
        handler: Arc<H>,
    ) -> Result<ServerHandle, ServerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let path = self.path.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fc_api".into())
            .spawn(move || {
                if let Err(e) = self.accept_loop(handler, stop2) {
                    warn!(error = %e, "API server stopped");
                }
            })
            .map_err(ServerError::Spawn)?;
        Ok(ServerHandle { stop, path, thread: Some(thread) })
    }

    fn accept_loop<H: ApiHandler + ?Sized + 'static>(
        self,
        handler: Arc<H>,
        stop: Arc<AtomicBool>,
    ) -> Result<(), ServerError> {
        let active = Arc::new(AtomicUsize::new(0));
        let config = Arc::new(self.config);
        let mut consecutive_errors = 0u32;
        loop {
            let accepted = self.listener.accept();
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let stream = match accepted {
                Ok((s, _)) => {
                    consecutive_errors = 0;
                    s
                }
                Err(e) => {
                    // EMFILE and friends are transient; back off instead of spinning.
                    consecutive_errors += 1;
                    warn!(error = %e, "accepting an API connection failed");
                    if consecutive_errors > 1000 {
                        return Err(ServerError::Accept(e));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if active.load(Ordering::SeqCst) >= config.max_connections {
                warn!(max = config.max_connections, "too many API connections; closing the new one");
                continue;
            }
            if let Some(t) = config.idle_timeout {
                let _ = stream.set_read_timeout(Some(t));
            }
            active.fetch_add(1, Ordering::SeqCst);
            let guard = ActiveGuard(active.clone());
            let handler = handler.clone();
            let config = config.clone();
            let spawned = std::thread::Builder::new().name("fc_api_conn".into()).spawn(move || {
                let _guard = guard;
                serve_connection(stream, handler.as_ref(), &config);
            });
            if let Err(e) = spawned {
                // The closure (and its guard) was dropped: the count is already restored.
                warn!(error = %e, "could not spawn a thread for an API connection");
            }
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Stops a server started with [`ApiServer::spawn`].
#[derive(Debug)]
pub struct ServerHandle {
    stop: Arc<AtomicBool>,
    path: Option<PathBuf>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting connections and waits for the accept thread. Connections already open
    /// are served until their clients close them. Without a socket path the accept thread
    /// cannot be woken and is left to end with the process.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(path) = &self.path {
            // Wake the blocking accept().
            if UnixStream::connect(path).is_ok() {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Serves one connection until the client closes it or breaks the protocol. Never panics on
/// client input; a panicking handler is answered with a 500.
pub fn serve_connection<S: Read + Write, H: ApiHandler + ?Sized>(
    mut stream: S,
    handler: &H,
    config: &ServerConfig,
) {
    let mut reader = RequestReader::new(config.max_payload_size);
    loop {
        let request = match reader.read_request(&mut stream) {
            Ok(r) => r,
            Err(HttpError::Closed) => return,
            Err(e) if e.is_bad_request() => {
                warn!(error = %e, "malformed API request; closing the connection");
                let body = serde_json::to_vec(&ApiError::new(e.to_string())).unwrap_or_default();
                let _ = write_response(&mut stream, StatusCode::BadRequest, Some(&body), false);
                return;
            }
            Err(e) => {
                debug!(error = %e, "API connection ended");
                return;
            }
        };
        let head = &request.head;
        info!(method = %head.method, path = %head.path, "API request");
        let response = match parse_request(&head.method, &head.path, request.body.as_deref()) {
            Ok(api_request) => match catch_unwind(AssertUnwindSafe(|| handler.handle(api_request))) {
                Ok(r) => r,
                Err(_) => ApiResponse::error(
                    StatusCode::InternalServerError,
                    "The request handler failed unexpectedly.",
                ),
            },
            Err(e) => {
                info!(error = %e, "API request refused");
                ApiResponse::from(e)
            }
        };
        if response.status.as_u16() >= 400 {
            info!(status = response.status.as_u16(), body = ?response.body, "API error response");
        }
        let keep_alive = head.keep_alive;
        if let Err(e) = write_response(
            &mut stream,
            response.status,
            response.body.as_deref().map(str::as_bytes),
            keep_alive,
        ) {
            debug!(error = %e, "writing an API response failed");
            return;
        }
        if !keep_alive {
            return;
        }
    }
}
