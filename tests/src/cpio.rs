//! A writer for the `newc` cpio format the Linux kernel unpacks as an initramfs.
//!
//! Writing the archive ourselves (instead of `find | cpio`) keeps it independent of the host's
//! file ownership, timestamps and directory order, so the same inputs give the same bytes, and lets
//! us add device nodes (`/dev/console`) without being root on the host.

use std::collections::BTreeSet;

/// newc magic: ASCII hex fields, no checksum.
const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Errors from building an archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("cpio entry name {0:?} is not a relative path without `..`")]
    BadName(String),
    #[error("cpio entry {name:?} is {len} bytes; newc stores sizes in 32 bits")]
    TooLarge { name: String, len: usize },
    #[error("cpio entry {0:?} was added twice")]
    Duplicate(String),
}

/// An in-memory newc archive. Parent directories are created implicitly.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
    names: BTreeSet<String>,
}

impl CpioWriter {
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
            names: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, name: &str) -> Result<(), CpioError> {
        let name = check_name(name)?;
        self.parents(name)?;
        if self.names.contains(name) {
            return Ok(());
        }
        self.entry(name, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let name = check_name(name)?;
        self.parents(name)?;
        self.unique(name)?;
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let name = check_name(name)?;
        self.parents(name)?;
        self.unique(name)?;
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let name = check_name(name)?;
        self.parents(name)?;
        self.unique(name)?;
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Appends the trailer and returns the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer carries ino 0 like GNU cpio writes it.
        self.next_ino = 0;
        self.write_header(TRAILER, 0, 1, (0, 0), 0);
        self.out
    }

    fn unique(&self, name: &str) -> Result<(), CpioError> {
        if self.names.contains(name) {
            return Err(CpioError::Duplicate(name.to_owned()));
        }
        Ok(())
    }

    fn parents(&mut self, name: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(pos) = name[end..].find('/') {
            let parent = &name[..end + pos];
            if !self.names.contains(parent) {
                self.entry(parent, S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
            end += pos + 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let len = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            len: data.len(),
        })?;
        self.write_header(name, mode, nlink, rdev, len);
        self.out.extend_from_slice(data);
        self.pad4();
        self.names.insert(name.to_owned());
        Ok(())
    }

    fn write_header(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), len: u32) {
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        // namesize counts the terminating NUL; names are short paths, far below u32::MAX.
        let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields: [u32; 13] = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime: fixed, for reproducible archives
            len, 0, // devmajor
            0, // devminor
            rdev.0, rdev.1, namesize, 0, // check
        ];
        self.out.extend_from_slice(MAGIC);
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
    }

    fn pad4(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }
}

fn check_name(name: &str) -> Result<&str, CpioError> {
    let trimmed = name.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() || trimmed.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(CpioError::BadName(name.to_owned()));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_file_archive_matches_newc_layout() {
        let mut w = CpioWriter::new();
        w.file("init", 0o755, b"hi\n").expect("file");
        let bytes = w.finish();
        let mut expected = Vec::new();
        // header: magic, ino=1, mode=0100755, uid, gid, nlink=1, mtime, filesize=3, dev 0:0,
        // rdev 0:0, namesize=5 ("init" + NUL), check
        expected.extend_from_slice(
            concat!(
                "070701", "00000001", "000081ED", "00000000", "00000000", "00000001", "00000000",
                "00000003", "00000000", "00000000", "00000000", "00000000", "00000005", "00000000",
            )
            .as_bytes(),
        );
        expected.extend_from_slice(b"init\0"); // 110 + 5 = 115, pad to 116
        expected.push(0);
        expected.extend_from_slice(b"hi\n\0"); // 3 bytes of data, pad to 4
        expected.extend_from_slice(
            concat!(
                "070701", "00000000", "00000000", "00000000", "00000000", "00000001", "00000000",
                "00000000", "00000000", "00000000", "00000000", "00000000", "0000000B", "00000000",
            )
            .as_bytes(),
        );
        expected.extend_from_slice(b"TRAILER!!!\0"); // 110 + 11 = 121, pad to 124
        expected.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(bytes, expected);
    }

    #[test]
    fn parents_come_first_and_once() {
        let mut w = CpioWriter::new();
        w.file("/lib/modules/a.ko", 0o644, b"x").expect("a");
        w.file("lib/modules/b.ko", 0o644, b"y").expect("b");
        w.dir("lib").expect("existing dir is fine");
        let bytes = w.finish();
        let text = String::from_utf8_lossy(&bytes);
        let lib = text.find("lib\0").expect("lib");
        let modules = text.find("lib/modules\0").expect("lib/modules");
        let a = text.find("lib/modules/a.ko\0").expect("a.ko");
        assert!(lib < modules && modules < a);
        assert_eq!(text.matches("lib/modules\0").count(), 1);
    }

    #[test]
    fn device_node_carries_rdev() {
        let mut w = CpioWriter::new();
        w.char_device("dev/console", 0o600, 5, 1).expect("console");
        let bytes = w.finish();
        let text = String::from_utf8_lossy(&bytes);
        // entry 2 is dev/console (entry 1 is the implicit dev/); mode 020600 = 0x2180
        let hdr = text.find("dev/console\0").expect("name") - 110;
        assert_eq!(&text[hdr..hdr + 6], "070701");
        assert_eq!(&text[hdr + 14..hdr + 22], "00002180");
        assert_eq!(&text[hdr + 78..hdr + 86], "00000005");
        assert_eq!(&text[hdr + 86..hdr + 94], "00000001");
    }

    #[test]
    fn rejects_bad_names_and_duplicates() {
        let mut w = CpioWriter::new();
        assert!(matches!(
            w.file("../etc/passwd", 0o644, b""),
            Err(CpioError::BadName(_))
        ));
        assert!(matches!(w.file("", 0o644, b""), Err(CpioError::BadName(_))));
        w.file("a", 0o644, b"").expect("a");
        assert_eq!(
            w.file("a", 0o644, b""),
            Err(CpioError::Duplicate("a".into()))
        );
    }
}
