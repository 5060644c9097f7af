//! File copies in and out of the guest, as single files or tar streams, in bounded chunks.
//!
//! Copy-in writes to a temporary file next to the target and renames it into place once complete
//! and synced, so a broken copy never leaves a half-written file under the target name. Data is
//! taken from the connection only within the credit granted here, and credit is returned as it is
//! written to disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_agent_proto::window::{RecvWindow, SendWindow};
use kiln_agent_proto::{Channel, CopyFormat, CopyIn, CopyOut, Message, MAX_DATA_CHUNK};

use crate::server::Conn;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reader loop's handle on a running copy-in.
pub struct CopyInSession {
    tx: Mutex<Option<Sender<Option<Vec<u8>>>>>,
    window: Mutex<RecvWindow>,
}

impl CopyInSession {
    /// Hands a chunk to the writer; `Err` when the host exceeded its credit (protocol error).
    pub fn push(&self, stream: u32, data: Vec<u8>) -> Result<(), String> {
        lock(&self.window).received(data.len()).map_err(|e| {
            format!(
                "the host sent {} bytes of copy data on stream {stream} with {} bytes of credit",
                e.outstanding, e.window
            )
        })?;
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(Some(data));
        }
        Ok(())
    }

    /// The host sent CopyEnd.
    pub fn end(&self) {
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(None);
        }
    }

    /// The connection ended: the copy is abandoned.
    pub fn abort(&self) {
        lock(&self.tx).take();
    }
}

/// Reads the chunks the host sends, returning credit as they are consumed.
struct ChunkReader {
    rx: Receiver<Option<Vec<u8>>>,
    session: Arc<CopyInSession>,
    conn: Arc<Conn>,
    stream: u32,
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
    total: u64,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Some(d)) => {
                    self.buf = d;
                    self.pos = 0;
                }
                Ok(None) => self.ended = true,
                Err(_) => {
                    return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the host connection ended"))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.total += n as u64;
        if let Some(bytes) = lock(&self.session.window).consumed(n) {
            self.conn.sink().send(self.stream, &Message::Credit { channel: Channel::Copy, bytes });
        }
        Ok(n)
    }
}

/// Starts the writer thread of a copy-in; the returned session receives the data.
pub fn start_copy_in(conn: Arc<Conn>, stream: u32, req: CopyIn) -> Arc<CopyInSession> {
    let (tx, rx) = channel();
    let session =
        Arc::new(CopyInSession { tx: Mutex::new(Some(tx)), window: Mutex::new(RecvWindow::default()) });
    let mut input = ChunkReader {
        rx,
        session: session.clone(),
        conn: conn.clone(),
        stream,
        buf: Vec::new(),
        pos: 0,
        ended: false,
        total: 0,
    };
    std::thread::spawn(move || {
        let result = match req.format {
            CopyFormat::File => write_file(&req, stream, &mut input),
            CopyFormat::Tar => unpack_tar(&req, &mut input),
        };
        match result {
            Ok(()) if input.ended => {
                conn.sink().send(stream, &Message::CopyDone { bytes: input.total });
            }
            Ok(()) => {}
            Err(e) => {
                conn.sink().error(stream, format!("copying into {}: {e}", req.path));
            }
        }
        conn.remove(stream);
    });
    session
}

fn absolute(path: &str) -> io::Result<&Path> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the guest path must be absolute"));
    }
    Ok(p)
}

fn write_file(req: &CopyIn, stream: u32, input: &mut ChunkReader) -> io::Result<()> {
    let path = absolute(&req.path)?;
    if path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a directory in the guest; give the destination file's full path",
        ));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a file path"));
    };
    let tmp: PathBuf = parent.join(format!(".{}.kiln-copy-{stream}", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mode = req.mode.unwrap_or(0o644) & 0o7777;
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        io::copy(input, &mut f)?;
        if !input.ended {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the copy was abandoned"));
        }
        // Exactly `mode`, whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn unpack_tar(req: &CopyIn, input: &mut ChunkReader) -> io::Result<()> {
    let dir = absolute(&req.path)?;
    std::fs::create_dir_all(dir)?;
    let mut archive = tar::Archive::new(&mut *input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.unpack(dir)?;
    // Whatever follows the archive's end (block padding) is read and dropped.
    io::copy(input, &mut io::sink())?;
    Ok(())
}

/// Sends what is written as CopyData chunks within the host's credit.
struct CreditWriter {
    conn: Arc<Conn>,
    stream: u32,
    window: Arc<SendWindow>,
    buf: Vec<u8>,
}

impl CreditWriter {
    fn send_buffered(&mut self) -> io::Result<()> {
        let mut sent = 0;
        while sent < self.buf.len() {
            let Some(n) = self.window.take(self.buf.len() - sent) else {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the host connection ended"));
            };
            if !self.conn.sink().send(self.stream, &Message::CopyData(self.buf[sent..sent + n].to_vec())) {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the host connection ended"));
            }
            sent += n;
        }
        self.buf.clear();
        Ok(())
    }
}

impl Write for CreditWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_DATA_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_DATA_CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// Starts the reader thread of a copy-out; `window` receives the host's credit.
pub fn start_copy_out(conn: Arc<Conn>, stream: u32, req: CopyOut, window: Arc<SendWindow>) {
    std::thread::spawn(move || {
        let mut out =
            CreditWriter { conn: conn.clone(), stream, window, buf: Vec::with_capacity(MAX_DATA_CHUNK) };
        let result = match req.format {
            CopyFormat::File => send_file(&req.path, &mut out),
            CopyFormat::Tar => send_tar(&req.path, &mut out),
        }
        .and_then(|()| out.flush());
        match result {
            Ok(()) => conn.sink().send(stream, &Message::CopyEnd),
            Err(e) => conn.sink().error(stream, format!("copying {} out: {e}", req.path)),
        };
        conn.remove(stream);
    });
}

fn send_file(path: &str, out: &mut CreditWriter) -> io::Result<()> {
    let mut f = File::open(absolute(path)?)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (copy directories as tar)",
        ));
    }
    io::copy(&mut f, out)?;
    Ok(())
}

fn send_tar(path: &str, out: &mut CreditWriter) -> io::Result<()> {
    let p = absolute(path)?;
    let name = p.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    append_tree(&mut b, p, &name, 0)?;
    b.into_inner()?;
    Ok(())
}

/// Deepest directory nesting archived (a guard against pathological trees).
const MAX_TAR_DEPTH: usize = 256;

/// Archives `src` as `name`, recursing into directories without following symlinks. Sockets,
/// fifos and devices are skipped (they cannot be copied meaningfully).
fn append_tree(
    b: &mut tar::Builder<&mut CreditWriter>,
    src: &Path,
    name: &Path,
    depth: usize,
) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
        tracing::debug!("copy-out: skipping special file {}", src.display());
        return Ok(());
    }
    b.append_path_with_name(src, name)?;
    if ft.is_dir() {
        if depth >= MAX_TAR_DEPTH {
            return Err(io::Error::other(format!("{} is nested too deeply", src.display())));
        }
        let mut entries: Vec<_> = std::fs::read_dir(src)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            append_tree(b, &e.path(), &name.join(e.file_name()), depth + 1)?;
        }
    }
    Ok(())
}
