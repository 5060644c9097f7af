//! Files and named pipes the VMM writes to (the log, the metrics, the serial console), opened the
//! way Firecracker's documentation asks for them: a named pipe must exist (`mkfifo`) and is opened
//! read-write and non-blocking, so opening never waits for a reader and a reader that stops reading
//! never stalls the VMM (what does not fit the pipe is lost and counted by the caller); a regular
//! file is created if missing and appended to.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Opens `path` for output; returns the file and whether it is a named pipe.
pub fn open(path: &Path) -> io::Result<(File, bool)> {
    let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut opts = OpenOptions::new();
    opts.custom_flags(libc::O_NONBLOCK);
    if fifo {
        opts.read(true).write(true);
    } else {
        opts.create(true).append(true);
    }
    Ok((opts.open(path)?, fifo))
}

/// Writes all of `buf` to a non-blocking file, waiting at most `patience` in total for a full
/// pipe to drain. A line is written whole or, when the time runs out, only partly (the reader then
/// sees one cut line; the caller counts it as missed).
pub fn write_all_within(file: &mut File, mut buf: &[u8], patience: Duration) -> io::Result<()> {
    let deadline = Instant::now() + patience;
    while !buf.is_empty() {
        match file.write(buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "nobody is reading the pipe"));
                }
                let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                // SAFETY: polls one pollfd we own for a bounded time; no other memory is passed.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_created_and_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.log");
        std::fs::write(&p, "old\n").unwrap();
        let (mut f, fifo) = open(&p).unwrap();
        assert!(!fifo);
        write_all_within(&mut f, b"new\n", Duration::from_millis(10)).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old\nnew\n");
        let (_, _) = open(&dir.path().join("fresh")).unwrap();
        assert!(dir.path().join("fresh").exists());
        assert!(open(&dir.path().join("no/such/dir/file")).is_err());
    }

    #[test]
    fn a_pipe_nobody_reads_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pipe");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening does not wait for a reader.
        let (mut f, fifo) = open(&p).unwrap();
        assert!(fifo);
        let line = vec![b'x'; 4096];
        let t0 = Instant::now();
        let mut failed = false;
        for _ in 0..64 {
            if write_all_within(&mut f, &line, Duration::from_millis(20)).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a full pipe reports an error instead of blocking");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
