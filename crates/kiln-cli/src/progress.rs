//! Progress of pulls, imports and root filesystem builds on stderr: one bar per layer on a terminal,
//! one line per finished blob otherwise.

use std::io::Write;
use std::sync::Mutex;

use kiln_image::{BlobKind, Progress, ProgressEvent};

struct Line {
    digest: String,
    label: String,
    done: u64,
    size: u64,
    state: &'static str,
}

pub struct Bars {
    tty: bool,
    lines: Mutex<(Vec<Line>, usize)>,
}

impl Bars {
    pub fn new() -> Self {
        Bars { tty: crate::term::stderr_is_tty(), lines: Mutex::new((Vec::new(), 0)) }
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn render(line: &Line) -> String {
    const WIDTH: u64 = 30;
    let filled = (line.done.min(line.size) * WIDTH).checked_div(line.size).unwrap_or(WIDTH);
    let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { ' ' }).collect();
    format!("{} [{bar}] {}/{} {}", line.label, mb(line.done), mb(line.size), line.state)
}

impl Progress for Bars {
    fn event(&self, event: ProgressEvent) {
        let mut guard = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let (lines, drawn) = &mut *guard;
        let mut err = std::io::stderr().lock();
        match event {
            ProgressEvent::Resolved { reference, manifest, layers } => {
                let _ = writeln!(err, "{reference}: {manifest} ({layers} layers)");
                return;
            }
            ProgressEvent::BlobStarted { digest, kind: BlobKind::Layer { index, count }, size } => {
                let short: String = digest.to_string().chars().skip(7).take(12).collect();
                lines.push(Line {
                    digest: digest.to_string(),
                    label: format!("layer {}/{count} {short}", index + 1),
                    done: 0,
                    size,
                    state: "downloading",
                });
            }
            ProgressEvent::BlobProgress { digest, done, .. } => {
                if let Some(l) = lines.iter_mut().find(|l| l.digest == digest.to_string()) {
                    l.done = done;
                }
                if !self.tty {
                    return;
                }
            }
            ProgressEvent::BlobDone { digest, reused } => {
                if let Some(l) = lines.iter_mut().find(|l| l.digest == digest.to_string()) {
                    l.done = l.size;
                    l.state = if reused { "already here" } else { "done" };
                    if !self.tty {
                        let _ = writeln!(err, "{}", render(l));
                    }
                }
            }
            ProgressEvent::Unpacking { index, count, .. } if !self.tty => {
                let _ = writeln!(err, "unpacking layer {}/{count}", index + 1);
                return;
            }
            ProgressEvent::BuildingFilesystem { bytes } => {
                let _ = writeln!(err, "building the root filesystem ({})", mb(bytes));
                return;
            }
            _ => return,
        }
        if self.tty {
            if *drawn > 0 {
                let _ = write!(err, "\x1b[{}A", *drawn);
            }
            for l in lines.iter() {
                let _ = writeln!(err, "\x1b[2K{}", render(l));
            }
            *drawn = lines.len();
        }
    }
}
