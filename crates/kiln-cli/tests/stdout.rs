//! kiln's output to a reader that went away (`kiln info | head -1`): a quiet exit, not a panic.

use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_kiln_quietly_with_141() {
    let root = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    // The reader is gone before kiln writes anything: its first line meets EPIPE.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["info"])
        .env("KILN_ROOT", root.path())
        .env_remove("KILN_LOG")
        .stdin(Stdio::null())
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
