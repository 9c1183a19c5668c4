//! A daemon's data dir: private modes (0700 for the directory, 0600 for databases and keys)
//! and the exclusive lock that keeps a second daemon off it.
//!
//! Policy (docs/security.md, "File modes"): a mode that lets others in is fixed and logged as
//! a warning; a file whose mode cannot be fixed (not ours) is refused. The data dir itself
//! may be a mounted volume owned by someone else (Kubernetes' `fsGroup`): when its mode cannot
//! be changed, the warning stays and the start goes on, since every secret inside is 0600.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::files::{FileError, io_err};

/// Mode of a data dir and of directories holding secrets.
pub const DIR_MODE: u32 = 0o700;
/// Mode of databases, keys and credentials.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700, or fixes an existing one that others
/// may enter (logged as a warning).
pub fn ensure_private_dir(dir: &Path) -> Result<(), FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err("create", dir))?;
    let mode = fs::metadata(dir)
        .map_err(io_err("inspect", dir))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    match fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)) {
        Ok(()) => tracing::warn!(
            path = %dir.display(),
            was = format_args!("{mode:o}"),
            now = format_args!("{DIR_MODE:o}"),
            "data dir was open to other users; made it private"
        ),
        Err(e) => tracing::warn!(
            path = %dir.display(),
            mode = format_args!("{mode:o}"),
            error = %e,
            "data dir is open to other users and its mode cannot be changed; the files holding secrets in it are 0600"
        ),
    }
    Ok(())
}

/// Fixes an existing file that others may read to 0600 (logged as a warning); refuses one
/// whose mode cannot be changed. A missing file is fine.
pub fn ensure_private_file(path: &Path) -> Result<(), FileError> {
    let mode = match fs::symlink_metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    if mode & 0o077 == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))
        .map_err(io_err("make private (chmod 600)", path))?;
    tracing::warn!(
        path = %path.display(),
        was = format_args!("{mode:o}"),
        now = format_args!("{FILE_MODE:o}"),
        "file holding secrets was readable by other users; made it private"
    );
    Ok(())
}

/// Creates an empty file with mode 0600 unless it exists (then fixes its mode as
/// [`ensure_private_file`] does), so a library that creates files with the process umask
/// (SQLite) finds a private one. The new directory entry is made durable.
pub fn create_private_file(path: &Path) -> Result<(), FileError> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(file) => {
            file.sync_all().map_err(io_err("sync", path))?;
            crate::files::sync_dir(path.parent().unwrap_or(Path::new(".")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => ensure_private_file(path),
        Err(e) => Err(io_err("create", path)(e)),
    }
}

/// Another process holds the data dir, or the lock file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// A second daemon on the same data dir.
    #[error(
        "data dir {dir} is in use by another {daemon}{}: {lock} is locked; stop that process or use another --data-dir",
        .holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Held {
        /// The data dir.
        dir: PathBuf,
        /// Which daemon the lock is for (`cloudcore serve`, `edgecore run`).
        daemon: &'static str,
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, as it wrote it into the lock file.
        holder: Option<u32>,
    },
    /// The data dir is on a read-only file system.
    #[error(
        "the data dir {dir} is on a read-only file system: {daemon} writes its lock and its \
         databases there; remount it read-write"
    )]
    ReadOnly { dir: PathBuf, daemon: &'static str },
    /// The lock file cannot be opened or locked.
    #[error(transparent)]
    File(#[from] FileError),
}

/// An exclusive `flock` on `DIR/<name>`, held until dropped (or the process dies: the kernel
/// releases it, so a crash never leaves a stale lock). The file holds the holder's pid.
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock without waiting; fails with [`LockError::Held`] naming the holder.
    pub fn acquire(dir: &Path, name: &str, daemon: &'static str) -> Result<DataDirLock, LockError> {
        let path = dir.join(name);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) {
                    LockError::ReadOnly {
                        dir: dir.to_path_buf(),
                        daemon,
                    }
                } else {
                    io_err("open", &path)(e).into()
                }
            })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    daemon,
                    lock: path,
                    holder: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(io_err("lock", &path)(e.into()).into()),
        }
        file.set_len(0).map_err(io_err("write", &path))?;
        file.rewind().map_err(io_err("write", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err("write", &path))?;
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn a_second_lock_is_refused_naming_dir_and_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path(), "x.lock", "edgecore run").expect("first");
        let err = DataDirLock::acquire(dir.path(), "x.lock", "edgecore run").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(
            text.contains(&format!(
                "in use by another edgecore run (pid {})",
                std::process::id()
            )),
            "{text}"
        );
        assert_eq!(mode(first.path()), 0o600);
        drop(first);
        DataDirLock::acquire(dir.path(), "x.lock", "edgecore run").expect("after drop");
    }

    #[test]
    fn open_modes_are_fixed_and_new_files_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("mkdir");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&data).expect("dir");
        assert_eq!(mode(&data), 0o700);
        let db = data.join("x.db");
        fs::write(&db, b"").expect("write");
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).expect("chmod");
        create_private_file(&db).expect("existing");
        assert_eq!(mode(&db), 0o600);
        let new = data.join("new.db");
        create_private_file(&new).expect("new");
        assert_eq!(mode(&new), 0o600);
        ensure_private_file(&data.join("missing")).expect("missing is fine");
        let nested = dir.path().join("a/b");
        ensure_private_dir(&nested).expect("nested");
        assert_eq!(mode(&nested), 0o700);
    }
}
