//! Cgroup v2: finding the mount and naming a cgroup from the id the kernel reports.
//!
//! The cgroup id from `bpf_get_current_cgroup_id()` is the inode number of the cgroup's directory on
//! the cgroup2 filesystem.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("no cgroup2 filesystem is mounted (searched {0}); mount one or pass --cgroup")]
    NoCgroup2Mount(PathBuf),
    #[error("cgroup path {0} is not usable: {1}")]
    BadPath(PathBuf, std::io::Error),
}

/// Finds the first cgroup2 mount point in `/proc/self/mountinfo`.
pub fn discover_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|e| CgroupError::Read(path.clone(), e))?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2Mount(path))
}

/// The mount point of the first cgroup2 filesystem in mountinfo text (see proc(5)).
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount_fields, fs_fields) = line.split_once(" - ")?;
        let fstype = fs_fields.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = mount_fields.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Some(value) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `path` is a directory of a cgroup2 filesystem we can attach to.
pub fn check_cgroup_dir(path: &Path) -> Result<(), CgroupError> {
    let meta = std::fs::metadata(path).map_err(|e| CgroupError::BadPath(path.to_owned(), e))?;
    if !meta.is_dir() {
        return Err(CgroupError::BadPath(
            path.to_owned(),
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let controllers = path.join("cgroup.procs");
    if !controllers.exists() {
        return Err(CgroupError::BadPath(
            path.to_owned(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a cgroup directory (no cgroup.procs)",
            ),
        ));
    }
    Ok(())
}

/// Maps cgroup ids to paths (relative to the cgroup2 root, starting with `/`), with a cache.
///
/// Blocking (reads procfs and may walk the cgroup tree): call it from a blocking task.
pub struct CgroupNames {
    root: PathBuf,
    proc_root: PathBuf,
    cache: Mutex<HashMap<u64, String>>,
}

/// Upper bound of cached names; the cache is cleared when it is reached (cgroups come and go).
const MAX_CACHED_NAMES: usize = 16_384;

impl CgroupNames {
    /// `root`: the cgroup2 hierarchy; `proc_root`: the procfs of the pid namespace the kernel's pids
    /// belong to (the host's).
    pub fn new(root: PathBuf, proc_root: PathBuf) -> Self {
        Self {
            root,
            proc_root,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The path of cgroup `id`, using the process `tgid` as a hint (its `/proc/<tgid>/cgroup`).
    pub fn name(&self, id: u64, tgid: u32) -> Option<String> {
        if let Some(name) = self.cache.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Some(name);
        }
        let name = self.name_from_proc(id, tgid).or_else(|| self.walk(id))?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHED_NAMES {
                cache.clear();
            }
            cache.insert(id, name.clone());
        }
        Some(name)
    }

    fn name_from_proc(&self, id: u64, tgid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.proc_dir(tgid).join("cgroup")).ok()?;
        let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        // Seen from a private cgroup namespace (a container), other cgroups are `/../..`-relative:
        // only the walk of the mounted hierarchy can name them.
        if relative.starts_with("/..") {
            return None;
        }
        let dir = self.root.join(relative.trim_start_matches('/'));
        (std::fs::metadata(&dir).ok()?.ino() == id).then(|| relative.to_owned())
    }

    /// `/proc/<tgid>` in the configured procfs.
    pub fn proc_dir(&self, tgid: u32) -> PathBuf {
        self.proc_root.join(tgid.to_string())
    }

    /// Breadth-first search of the cgroup tree for the directory whose inode is `id`.
    fn walk(&self, id: u64) -> Option<String> {
        let mut queue = std::collections::VecDeque::from([self.root.clone()]);
        let mut visited = 0usize;
        while let Some(dir) = queue.pop_front() {
            visited += 1;
            if visited > 100_000 {
                return None;
            }
            let meta = std::fs::metadata(&dir).ok()?;
            if meta.ino() == id {
                let relative = dir.strip_prefix(&self.root).ok()?;
                return Some(format!("/{}", relative.display()));
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    queue.push_back(entry.path());
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_hybrid_unified_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_the_unified_mount_with_optional_fields() {
        let text = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(text), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let text = "29 23 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(text), Some(PathBuf::from("/mnt/my cgroup")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        let text = "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(parse_cgroup2_mount(text), None);
        assert_eq!(parse_cgroup2_mount("garbage line\n\n"), None);
    }
}
