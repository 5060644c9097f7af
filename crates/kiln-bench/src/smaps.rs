//! VMM overhead memory from `/proc/<pid>/smaps`: the resident set of every mapping except the
//! guest's RAM, which is identified as the anonymous mapping(s) whose size equals the guest memory
//! size.

use serde::{Deserialize, Serialize};

/// One mapping of a smaps file: its size and resident set (KiB), and its path (empty if anonymous).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub size_kib: u64,
    pub rss_kib: u64,
    pub path: String,
}

/// What one sample of a VMM process's smaps says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemSample {
    /// Rss of all mappings.
    pub total_rss_kib: u64,
    /// Rss of the mapping(s) taken to be guest RAM.
    pub guest_rss_kib: u64,
    /// How many mappings were taken to be guest RAM.
    pub guest_mappings: u32,
    /// `total_rss_kib - guest_rss_kib`: what the VMM itself costs.
    pub overhead_kib: u64,
}

/// Parses smaps text into mappings. Lines that fit neither a mapping header nor a `Key: N kB`
/// field are ignored (the kernel adds fields over time).
pub fn parse(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some((start, end, path)) = header(line) {
            out.push(Mapping { size_kib: end.saturating_sub(start) / 1024, rss_kib: 0, path });
            continue;
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib = rest.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            if let Some(m) = out.last_mut() {
                m.rss_kib = kib;
            }
        }
    }
    out
}

/// `start-end perms offset dev inode [path]` → (start, end, path).
fn header(line: &str) -> Option<(u64, u64, String)> {
    let mut it = line.split_whitespace();
    let range = it.next()?;
    let (s, e) = range.split_once('-')?;
    let start = u64::from_str_radix(s, 16).ok()?;
    let end = u64::from_str_radix(e, 16).ok()?;
    let perms = it.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = it.next()?;
    let dev = it.next()?;
    if !dev.contains(':') {
        return None;
    }
    let _inode = it.next()?;
    let path = it.collect::<Vec<_>>().join(" ");
    Some((start, end, path))
}

/// Anonymous memory as the guest's RAM would be: no backing path, a named anonymous mapping, or a
/// memfd.
fn is_anonymous(path: &str) -> bool {
    path.is_empty() || path.starts_with("[anon") || path.starts_with("/memfd:")
}

/// Splits the resident set into guest RAM and VMM overhead. Returns `None` when no anonymous mapping
/// has the guest memory's size (then the guest RAM cannot be told apart).
pub fn overhead(mappings: &[Mapping], guest_mem_kib: u64) -> Option<MemSample> {
    let total_rss_kib = mappings.iter().map(|m| m.rss_kib).sum();
    let guest: Vec<&Mapping> =
        mappings.iter().filter(|m| m.size_kib == guest_mem_kib && is_anonymous(&m.path)).collect();
    if guest.is_empty() {
        return None;
    }
    let guest_rss_kib: u64 = guest.iter().map(|m| m.rss_kib).sum();
    Some(MemSample {
        total_rss_kib,
        guest_rss_kib,
        guest_mappings: u32::try_from(guest.len()).unwrap_or(u32::MAX),
        overhead_kib: total_rss_kib.saturating_sub(guest_rss_kib),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0000000-55d0c0200000 r-xp 00000000 08:01 1234                       /usr/bin/kiln-vmm
Size:               2048 kB
Rss:                1500 kB
Pss:                1500 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               20480 kB
7f0008000000-7f0008001000 ---p 00000000 00:00 0 
Size:                  4 kB
Rss:                   0 kB
7f0010000000-7f0010100000 rw-p 00000000 00:00 0                          [heap]
Size:               1024 kB
Rss:                 800 kB
";

    #[test]
    fn parses_mappings() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].path, "/usr/bin/kiln-vmm");
        assert_eq!(m[0].size_kib, 2048);
        assert_eq!(m[1].size_kib, 131072);
        assert_eq!(m[1].rss_kib, 20480);
        assert_eq!(m[3].path, "[heap]");
    }

    #[test]
    fn excludes_guest_ram() {
        let s = overhead(&parse(SAMPLE), 128 * 1024).expect("guest mapping found");
        assert_eq!(s.total_rss_kib, 1500 + 20480 + 800);
        assert_eq!(s.guest_rss_kib, 20480);
        assert_eq!(s.guest_mappings, 1);
        assert_eq!(s.overhead_kib, 2300);
    }

    #[test]
    fn no_guest_mapping_is_none() {
        assert_eq!(overhead(&parse(SAMPLE), 256 * 1024), None);
        assert!(parse("garbage\n\n").is_empty());
    }
}
