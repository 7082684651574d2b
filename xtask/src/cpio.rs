//! A writer for the cpio "newc" format (the one the Linux initramfs unpacker reads).
//!
//! Reference: the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`.
//! Every entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields), the
//! NUL-terminated name padded so the header plus name is a multiple of 4, then the data
//! padded to a multiple of 4. The archive ends with an entry named `TRAILER!!!`.
//!
//! [`Archive`] collects entries in a tree (parents are added automatically), and
//! [`Archive::write`] emits them reproducibly: owner root, mtime 0, all directories first
//! (sorted, so parents come before children), then everything else sorted by path.

use std::collections::BTreeMap;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with permission bits (e.g. 0o755).
    Dir { perm: u32 },
    /// A regular file with permission bits and contents.
    File { perm: u32, data: Vec<u8> },
    /// A symbolic link to `target`.
    Symlink { target: String },
    /// A character device node.
    CharDev { perm: u32, major: u32, minor: u32 },
}

impl Node {
    fn mode(&self) -> u32 {
        match self {
            Node::Dir { perm } => S_IFDIR | (perm & 0o7777),
            Node::File { perm, .. } => S_IFREG | (perm & 0o7777),
            Node::Symlink { .. } => S_IFLNK | 0o777,
            Node::CharDev { perm, .. } => S_IFCHR | (perm & 0o7777),
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Node::File { data, .. } => data,
            Node::Symlink { target } => target.as_bytes(),
            Node::Dir { .. } | Node::CharDev { .. } => &[],
        }
    }
}

/// An in-memory cpio archive, keyed by path (no leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

/// Strips leading/trailing slashes and rejects `.`/`..`/empty components.
fn normalize(path: &str) -> io::Result<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad archive path {path:?}"),
        ));
    }
    Ok(parts.join("/"))
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `node` at `path`, creating missing parent directories (mode 0755).
    /// A later insert at the same path replaces the earlier one, except that an existing
    /// directory cannot be replaced by a non-directory.
    pub fn insert(&mut self, path: &str, node: Node) -> io::Result<()> {
        let path = normalize(path)?;
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for comp in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Node::Dir { perm: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{parent:?} is not a directory (adding {path:?})"),
                    ))
                }
            }
        }
        if let Some(Node::Dir { .. }) = self.entries.get(&path) {
            if !matches!(node, Node::Dir { .. }) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{path:?} is a directory"),
                ));
            }
        }
        self.entries.insert(path, node);
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.insert(path, Node::Dir { perm })
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> io::Result<()> {
        self.insert(path, Node::File { perm, data })
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.insert(path, Node::CharDev { perm, major, minor })
    }

    /// Whether `path` is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// Total size of file contents, for reporting.
    pub fn data_len(&self) -> usize {
        self.entries.values().map(|n| n.data().len()).sum()
    }

    /// Writes the archive, including the trailer, in newc format.
    pub fn write<W: Write>(&self, out: &mut W) -> io::Result<()> {
        let dirs = self
            .entries
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir { .. }));
        let rest = self
            .entries
            .iter()
            .filter(|(_, n)| !matches!(n, Node::Dir { .. }));
        for (ino, (path, node)) in (1u32..).zip(dirs.chain(rest)) {
            let (major, minor) = match node {
                Node::CharDev { major, minor, .. } => (*major, *minor),
                _ => (0, 0),
            };
            let nlink = if matches!(node, Node::Dir { .. }) {
                2
            } else {
                1
            };
            write_entry(
                out,
                &Header {
                    ino,
                    mode: node.mode(),
                    nlink,
                    rdev_major: major,
                    rdev_minor: minor,
                },
                path,
                node.data(),
            )?;
        }
        write_entry(
            out,
            &Header {
                ino: 0,
                mode: 0,
                nlink: 1,
                rdev_major: 0,
                rdev_minor: 0,
            },
            "TRAILER!!!",
            &[],
        )
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.data_len() + self.entries.len() * 160 + 128);
        self.write(&mut v).expect("writing to a Vec cannot fail");
        v
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

const NEWC_HEADER_LEN: usize = 110;

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn write_entry<W: Write>(out: &mut W, h: &Header, name: &str, data: &[u8]) -> io::Result<()> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB in cpio"))?;
    let namesize = name.len() + 1;
    let header = format!(
        "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        h.ino,
        h.mode,
        0, // uid: root
        0, // gid: root
        h.nlink,
        0, // mtime: reproducible
        size,
        0, // devmajor
        0, // devminor
        h.rdev_major,
        h.rdev_minor,
        namesize,
        0, // check
    );
    debug_assert_eq!(header.len(), NEWC_HEADER_LEN);
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(NEWC_HEADER_LEN + namesize)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..pad4(data.len())])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, nlink, rdevmajor, rdevminor, data).
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            let off = total - b.len();
            assert_eq!(off % 4, 0, "entry not 4-byte aligned");
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + i * 8..6 + i * 8 + 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, uid, gid, nlink, mtime, size) =
                (field(1), field(2), field(3), field(4), field(5), field(6));
            assert_eq!((uid, gid, mtime), (0, 0, 0));
            let (rmaj, rmin, namesize) = (field(9), field(10), field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_off = 110 + namesize + pad4(110 + namesize);
            let data = b[data_off..data_off + size as usize].to_vec();
            b = &b[data_off + size as usize + pad4(size as usize)..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, nlink, rmaj, rmin, data));
        }
    }

    #[test]
    fn tiny_archive_is_byte_exact() {
        let mut a = Archive::new();
        a.file("/a", 0o644, b"hi\n".to_vec()).unwrap();
        let bytes = a.to_bytes();
        let mut want = Vec::new();
        // "a": ino 1, regular 0644, nlink 1, size 3, namesize 2.
        for field in [
            "070701", "00000001", "000081A4", "00000000", "00000000", "00000001", "00000000",
            "00000003", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
        ] {
            want.extend_from_slice(field.as_bytes());
        }
        want.extend_from_slice(b"a\0"); // 110 + 2 = 112: no name padding
        want.extend_from_slice(b"hi\n\0"); // 3 bytes of data + 1 pad
                                           // trailer: ino 0, mode 0, nlink 1, namesize 11.
        for field in [
            "070701", "00000000", "00000000", "00000000", "00000000", "00000001", "00000000",
            "00000000", "00000000", "00000000", "00000000", "00000000", "0000000B", "00000000",
        ] {
            want.extend_from_slice(field.as_bytes());
        }
        want.extend_from_slice(b"TRAILER!!!\0"); // 110 + 11 = 121
        want.extend_from_slice(&[0, 0, 0]); // pad to 124
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(bytes, want);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn parents_first_and_kinds() {
        let mut a = Archive::new();
        a.file("bin/busybox", 0o755, vec![1, 2, 3, 4, 5]).unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.dir("proc", 0o555).unwrap();
        a.file("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        let entries = parse(&a.to_bytes());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "proc",
                "bin/busybox",
                "bin/sh",
                "dev/console",
                "init"
            ]
        );
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!(entries[0].2, 2);
        assert_eq!(entries[2].1, 0o040555);
        assert_eq!(entries[3].1, 0o100755);
        assert_eq!(entries[3].5, vec![1, 2, 3, 4, 5]);
        assert_eq!(entries[4].1, 0o120777);
        assert_eq!(entries[4].5, b"busybox");
        assert_eq!((entries[5].1, entries[5].3, entries[5].4), (0o020600, 5, 1));
    }

    #[test]
    fn rejects_bad_paths_and_conflicts() {
        let mut a = Archive::new();
        assert!(a.file("../x", 0o644, vec![]).is_err());
        assert!(a.file("/", 0o644, vec![]).is_err());
        a.file("f", 0o644, vec![]).unwrap();
        assert!(a.file("f/g", 0o644, vec![]).is_err());
        a.dir("d", 0o755).unwrap();
        assert!(a.file("d", 0o644, vec![]).is_err());
        assert!(a.contains("/d"));
    }
}
