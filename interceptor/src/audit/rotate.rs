//! A file rotated by size, line by line.
//!
//! Written here rather than with `file-rotate` because the audit log needs what that crate does not
//! give: a line is never split across files or left half-written (a failed write is cut back), a file
//! that cannot be opened is an error the caller counts (not a silent no-op), and the file is reopened
//! once it can be written again (a full disk that was cleaned, a directory that came back).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a file that could not be opened is tried again.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// `path`, rotated to `path.1` … `path.<keep>` before it would grow past `max_bytes`.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<File>,
    size: u64,
    last_open_attempt: Option<Instant>,
}

impl RotatingFile {
    /// Opens (or creates, mode 0640) `path` for appending.
    pub fn open(path: PathBuf, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        let (file, error) = Self::open_or_retry(path, max_bytes, keep);
        match error {
            Some(e) => Err(e),
            None => Ok(file),
        }
    }

    /// Opens `path`, or returns the error with a file that tries again on later writes (a log
    /// directory that is read-only or missing for now must not stop the daemon).
    pub fn open_or_retry(path: PathBuf, max_bytes: u64, keep: usize) -> (Self, Option<std::io::Error>) {
        let mut file = Self {
            path,
            max_bytes: max_bytes.max(1),
            keep,
            file: None,
            size: 0,
            last_open_attempt: None,
        };
        let error = file.reopen().err();
        (file, error)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.last_open_attempt = Some(Instant::now());
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    /// `path.n`.
    fn numbered(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Shifts `path.n` to `path.n+1` (the oldest is removed), `path` to `path.1`, and starts a new file.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = self.numbered(n);
                if from.exists() {
                    std::fs::rename(&from, self.numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.numbered(1))?;
        }
        self.reopen()
    }

    /// The files that exist, newest first (`path`, `path.1`, ...).
    pub fn files(path: &Path, keep: usize) -> Vec<PathBuf> {
        let mut files = vec![path.to_path_buf()];
        for n in 1..=keep {
            let mut name = path.to_path_buf().into_os_string();
            name.push(format!(".{n}"));
            files.push(PathBuf::from(name));
        }
        files.into_iter().filter(|p| p.exists()).collect()
    }
}

impl super::LineSink for RotatingFile {
    fn room(&self) -> u64 {
        self.max_bytes.saturating_sub(self.size)
    }

    fn write_lines(&mut self, line: &[u8]) -> std::io::Result<bool> {
        if self.file.is_none() {
            let recently = self
                .last_open_attempt
                .is_some_and(|at| at.elapsed() < REOPEN_INTERVAL);
            if recently {
                return Err(std::io::Error::other("the audit file could not be opened"));
            }
            self.reopen()?;
        }
        let mut rotated = false;
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            if let Err(e) = self.rotate() {
                self.file = None;
                return Err(e);
            }
            rotated = true;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(std::io::Error::other("the audit file is not open"));
        };
        match file.write_all(line) {
            Ok(()) => {
                self.size += line.len() as u64;
                Ok(rotated)
            }
            Err(e) => {
                // Cut back what part of the line was written; if even that fails, reopen next time
                // (the size is read again then).
                if file.set_len(self.size).is_err() {
                    self.file = None;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::LineSink as _;
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("interceptor-rotate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn rotates_by_size_keeping_whole_lines() {
        let dir = temp_dir("size");
        let path = dir.join("audit.log");
        let mut file = RotatingFile::open(path.clone(), 100, 3).expect("open");
        let mut rotations = 0;
        for i in 0..20 {
            let line = format!("{{\"n\":{i:02},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}\n");
            if file.write_lines(line.as_bytes()).expect("write") {
                rotations += 1;
            }
        }
        assert!(rotations >= 5, "{rotations}");
        let files = RotatingFile::files(&path, 3);
        assert_eq!(files.len(), 4, "the file and 3 rotated ones: {files:?}");
        let mut numbers = Vec::new();
        for file in files.iter().rev() {
            let text = std::fs::read_to_string(file).expect("read");
            assert!(text.len() <= 100, "{file:?} is {} bytes", text.len());
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).expect("whole JSON lines");
                numbers.push(value["n"].as_u64().expect("n"));
            }
        }
        // The newest lines survive, in order, without a gap.
        assert_eq!(numbers.last(), Some(&19));
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_removed_directory_is_an_error_then_recovers() {
        let dir = temp_dir("gone");
        let path = dir.join("sub/audit.log");
        let mut file = RotatingFile::open(path.clone(), 1_000, 1).expect("open");
        file.write_lines(b"{\"a\":1}\n").expect("write");
        std::fs::remove_dir_all(dir.join("sub")).expect("remove");
        // The open file still takes writes (unlinked); a rotation needs the directory.
        let mut saw_error = false;
        for _ in 0..200 {
            if file.write_lines(b"{\"b\":2}\n").is_err() {
                saw_error = true;
                break;
            }
        }
        assert!(saw_error, "rotation without the directory fails");
        std::thread::sleep(REOPEN_INTERVAL);
        file.write_lines(b"{\"c\":3}\n").expect("recreated");
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
