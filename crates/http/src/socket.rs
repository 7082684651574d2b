// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Creating the listening socket file with mode 0600 and removing it again.
//!
//! The socket is bound inside a fresh directory of mode 0700 next to the target, where no
//! other user can reach it, made 0600 there, and then hard-linked to the target path. `link`
//! fails when the target exists, so an existing file is never replaced, even one created
//! after the first check. The temporary name and directory are removed before `bind`
//! returns. The process umask is neither read nor changed.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use log::{debug, warn};

use crate::{Error, Result};

/// Longest path `bind` takes (`sun_path` is 108 bytes with the final NUL).
const MAX_SUN_PATH: usize = 107;

/// The bound socket file, removed on drop if it is still the same inode.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta)
                if meta.file_type().is_socket()
                    && meta.dev() == self.dev
                    && meta.ino() == self.ino =>
            {
                if let Err(e) = fs::remove_file(&self.path) {
                    warn!("failed to remove socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => debug!(
                "{} is no longer our socket, leaving it",
                self.path.display()
            ),
            Err(e) => debug!("socket {} is gone: {e}", self.path.display()),
        }
    }
}

/// Removes the temporary socket name and directory, whatever happens.
struct TempDir {
    dir: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.dir.join("s"));
        if let Err(e) = fs::remove_dir(&self.dir) {
            warn!("failed to remove {}: {e}", self.dir.display());
        }
    }
}

fn create_private_dir(parent: &Path) -> Result<TempDir> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut attempt = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".tvm-http-{:x}-{n:x}", std::process::id()));
        // The mode is masked by the umask, which can only make it stricter.
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                let guard = TempDir { dir };
                // Make sure we can use it ourselves whatever the umask removed.
                fs::set_permissions(&guard.dir, fs::Permissions::from_mode(0o700)).map_err(
                    |source| Error::CreateTempDir {
                        path: parent.to_path_buf(),
                        source,
                    },
                )?;
                return Ok(guard);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(source) => {
                return Err(Error::CreateTempDir {
                    path: parent.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Binds a listening socket at `path` with mode 0600; fails if `path` exists.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    match fs::symlink_metadata(path) {
        Ok(_) => return Err(Error::PathExists(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::StatPath {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    // Clients could not connect to a longer path (the /proc detour below is for our
    // temporary name only).
    if path.as_os_str().len() > MAX_SUN_PATH {
        return Err(Error::PathTooLong(path.to_path_buf()));
    }
    if path.file_name().is_none() {
        return Err(Error::InvalidPath(path.to_path_buf()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };

    let temp = create_private_dir(parent)?;
    let temp_sock = temp.dir.join("s");
    let bind_err = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = if temp_sock.as_os_str().len() <= MAX_SUN_PATH {
        UnixListener::bind(&temp_sock).map_err(bind_err)?
    } else {
        // The temporary name is too long for `sun_path`: reach the directory through a
        // short /proc/self/fd path instead.
        let dir = File::open(&temp.dir).map_err(bind_err)?;
        let mut short = OsString::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        short.push("/s");
        UnixListener::bind(&short).map_err(bind_err)?
    };
    fs::set_permissions(&temp_sock, fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::SetPermissions {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let meta = fs::symlink_metadata(&temp_sock).map_err(|source| Error::StatPath {
        path: temp_sock.clone(),
        source,
    })?;

    if let Err(e) = fs::hard_link(&temp_sock, path) {
        if e.kind() == io::ErrorKind::AlreadyExists {
            return Err(Error::PathExists(path.to_path_buf()));
        }
        // Some file systems refuse hard links; fall back to a rename, which can only replace
        // a file created in the short window after this second check.
        debug!("link to {} failed ({e}), renaming instead", path.display());
        if fs::symlink_metadata(path).is_ok() {
            return Err(Error::PathExists(path.to_path_buf()));
        }
        fs::rename(&temp_sock, path).map_err(|source| Error::Publish {
            path: path.to_path_buf(),
            source,
        })?;
    }
    drop(temp);

    // From here on, dropping `file` removes the socket again.
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    listener
        .set_nonblocking(true)
        .map_err(Error::ConfigureListener)?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn socket_has_mode_0600_and_no_leftovers() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        let (_listener, file) = bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(file.path(), path);
        assert_eq!(entries(dir.as_path()), vec!["api.sock".to_string()]);
        // It accepts connections under its final name.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn existing_paths_are_refused_and_kept() {
        let dir = TempDir::new().unwrap();
        let file = dir.as_path().join("file");
        fs::write(&file, b"keep me").unwrap();
        let subdir = dir.as_path().join("dir");
        fs::create_dir(&subdir).unwrap();
        let dangling = dir.as_path().join("dangling");
        symlink(dir.as_path().join("nowhere"), &dangling).unwrap();
        let sock = dir.as_path().join("sock");
        let (_listener, _sock_file) = bind(&sock).unwrap();

        for path in [&file, &subdir, &dangling, &sock] {
            match bind(path) {
                Err(err @ Error::PathExists(_)) => {
                    let message = err.to_string();
                    assert!(
                        message.contains(path.to_str().unwrap()),
                        "{message} does not name {}",
                        path.display()
                    );
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
        assert!(subdir.is_dir());
        assert!(fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(entries(dir.as_path()), ["dangling", "dir", "file", "sock"]);
    }

    #[test]
    fn removed_on_drop_only_if_still_ours() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        let (listener, file) = bind(&path).unwrap();
        drop(file);
        drop(listener);
        assert!(fs::symlink_metadata(&path).is_err(), "socket left behind");

        // Replaced by someone else: left alone.
        let (_listener, file) = bind(&path).unwrap();
        fs::rename(&path, dir.as_path().join("moved.sock")).unwrap();
        fs::write(&path, b"not ours").unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"not ours");
    }

    #[test]
    fn long_paths_bind_through_proc() {
        let dir = TempDir::new().unwrap();
        // Short enough for sun_path itself, too long once the temporary directory is added.
        let len = dir.as_path().as_os_str().len();
        let name = "a".repeat(MAX_SUN_PATH - len - 1);
        let path = dir.as_path().join(name);
        assert_eq!(path.as_os_str().len(), MAX_SUN_PATH);
        let (_listener, _file) = bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn too_long_paths_are_refused() {
        let dir = TempDir::new().unwrap();
        let len = dir.as_path().as_os_str().len();
        let path = dir.as_path().join("a".repeat(MAX_SUN_PATH - len));
        assert!(matches!(bind(&path), Err(Error::PathTooLong(_))));
        assert_eq!(entries(dir.as_path()), Vec::<String>::new());
    }

    #[test]
    fn odd_paths() {
        assert!(matches!(bind(Path::new("/")), Err(Error::PathExists(_))));
        let dir = TempDir::new().unwrap();
        let missing = dir.as_path().join("no/such/dir/api.sock");
        assert!(matches!(bind(&missing), Err(Error::CreateTempDir { .. })));
        let dotdot = dir.as_path().join("no/..");
        assert!(matches!(bind(&dotdot), Err(Error::InvalidPath(_))));
    }
}
