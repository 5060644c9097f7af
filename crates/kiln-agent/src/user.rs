//! OCI `User` resolution against the guest's own /etc/passwd and /etc/group, parsed here: a static
//! glibc binary must not call getpwnam & co. (they load NSS modules the guest may not have).

use std::io::Read;
use std::path::Path;

/// Bytes read from /etc/passwd or /etc/group at most.
const MAX_DB_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    /// Home directory from /etc/passwd, `/` when the user has no entry.
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error(
        "user {0:?} not found in the guest's /etc/passwd (use a numeric uid, or add the user to the image)"
    )]
    NoSuchUser(String),
    #[error(
        "group {0:?} not found in the guest's /etc/group (use a numeric gid, or add the group to the image)"
    )]
    NoSuchGroup(String),
    #[error("invalid user {0:?}: expected name, uid, name:group or uid:gid")]
    Invalid(String),
}

/// Valid ids: 0 ..= 2^32 - 2 (-1 means "unchanged" to the kernel).
fn parse_id(s: &str) -> Option<u32> {
    s.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

/// Parses /etc/passwd text; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: parse_id(f[2])?,
                gid: parse_id(f[3])?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses /etc/group text; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: parse_id(f[2])?,
                members: f[3].split(',').filter(|m| !m.is_empty()).map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Resolves an OCI `User` value (`""`, `name`, `uid`, `name:group`, `uid:gid`, mixed) the way
/// container runtimes do: a name must exist; a numeric uid need not (gid 0, home `/`); without a
/// group the passwd entry's group is used; supplementary groups are those listing the user's name.
pub fn resolve(spec: &str, passwd: &[PasswdEntry], groups: &[GroupEntry]) -> Result<Identity, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let user = if user.is_empty() { "0" } else { user };
    let entry = match parse_id(user) {
        Some(uid) => passwd.iter().find(|p| p.uid == uid).cloned().map(Ok).unwrap_or(Err(uid)),
        None if user.bytes().all(|b| b.is_ascii_digit()) => return Err(UserError::Invalid(spec.to_string())),
        None => Ok(passwd
            .iter()
            .find(|p| p.name == user)
            .cloned()
            .ok_or_else(|| UserError::NoSuchUser(user.to_string()))?),
    };
    let (uid, name, primary, home) = match entry {
        Ok(p) => (p.uid, Some(p.name), p.gid, p.home),
        Err(uid) => (uid, None, 0, "/".to_string()),
    };
    let gid = match group {
        None => primary,
        Some(g) => match parse_id(g) {
            Some(gid) => gid,
            None if g.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(UserError::Invalid(spec.to_string()))
            }
            None => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::NoSuchGroup(g.into()))?,
        },
    };
    let mut supplementary = vec![gid];
    if let Some(name) = &name {
        for g in groups.iter().filter(|g| g.members.iter().any(|m| m == name)) {
            if !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    let home = if home.is_empty() { "/".to_string() } else { home };
    Ok(Identity { uid, gid, groups: supplementary, home })
}

fn read_db(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        // A missing or unreadable file is an empty database: names then fail to resolve clearly.
        let _ = f.take(MAX_DB_BYTES).read_to_string(&mut text);
    }
    text
}

/// Resolves `spec` against `<etc>/passwd` and `<etc>/group`.
pub fn resolve_in(spec: &str, etc: &Path) -> Result<Identity, UserError> {
    let passwd = parse_passwd(&read_db(&etc.join("passwd")));
    let groups = parse_group(&read_db(&etc.join("group")));
    resolve(spec, &passwd, &groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\n\
        bad:x:notanumber:1:::\n\
        nohome:x:1001:1001:::/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nwheel:x:10:alice,bob\nalice:x:1000:\naudio:x:29:alice\nstaff:x:50:\nbroken\n";

    fn r(spec: &str) -> Result<Identity, UserError> {
        resolve(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn parsing_skips_malformed_lines() {
        let p = parse_passwd(PASSWD);
        assert_eq!(
            p.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["root", "daemon", "alice", "nohome"]
        );
        assert_eq!(
            p[2],
            PasswdEntry { name: "alice".into(), uid: 1000, gid: 1000, home: "/home/alice".into() }
        );
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 5);
        assert_eq!(g[1].members, ["alice", "bob"]);
    }

    #[test]
    fn empty_is_root() {
        assert_eq!(r("").unwrap(), Identity { uid: 0, gid: 0, groups: vec![0], home: "/root".into() });
    }

    #[test]
    fn name_gets_its_group_home_and_memberships() {
        let id = r("alice").unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(id.groups, vec![1000, 10, 29]);
    }

    #[test]
    fn numeric_uid_without_entry_gets_gid_0_and_root_dir() {
        assert_eq!(r("4242").unwrap(), Identity { uid: 4242, gid: 0, groups: vec![0], home: "/".into() });
        assert_eq!(r("4242:77").unwrap().gid, 77);
        // A numeric uid with an entry uses it.
        assert_eq!(r("1000").unwrap().home, "/home/alice");
    }

    #[test]
    fn explicit_groups_by_name_and_number() {
        let id = r("alice:staff").unwrap();
        assert_eq!((id.uid, id.gid), (1000, 50));
        assert_eq!(id.groups, vec![50, 10, 29]);
        assert_eq!(r("daemon:0").unwrap().gid, 0);
        assert_eq!(r("1001").unwrap().home, "/", "an empty home field means /");
    }

    #[test]
    fn errors_say_what_is_missing() {
        assert_eq!(r("mallory"), Err(UserError::NoSuchUser("mallory".into())));
        assert_eq!(r("alice:nogroup"), Err(UserError::NoSuchGroup("nogroup".into())));
        for bad in ["alice:", "a:b:c", "4294967295", "99999999999", "1:4294967295"] {
            assert!(matches!(r(bad), Err(UserError::Invalid(_))), "{bad}");
        }
        assert!(r("mallory").unwrap_err().to_string().contains("/etc/passwd"));
    }
}
