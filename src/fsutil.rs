//! File access that a hostile folder cannot turn against virtplan, which runs as root:
//! every file virtplan writes is opened without following a final symlink, every file it reads
//! must be a regular file and is read through a bounded reader, and replacements are atomic
//! (write a temporary file beside the target, fsync, rename over it, fsync the folder) so
//! readers see the old or the new file, never half of one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Why a file was refused or could not be read. Messages carry no path: callers add it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The final path component is a symbolic link, which virtplan never writes through.
    #[error("it is a symbolic link; virtplan never reads or writes its own files through one (it could point at any file): remove the link")]
    Symlink,
    /// A directory, FIFO, socket or device.
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    /// `size` when the file system reported it, `None` when the reader counted past `limit`.
    #[error("it is larger than {limit} bytes")]
    TooLarge { limit: u64, size: Option<u64> },
}

impl FileError {
    /// An `io::ErrorKind` for every case, so callers written against `io::Error` keep working:
    /// `NotFound` only for a missing file.
    #[must_use]
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Self::Io(e) => e.kind(),
            Self::Symlink | Self::NotRegular(_) => io::ErrorKind::InvalidInput,
            Self::TooLarge { .. } => io::ErrorKind::InvalidData,
        }
    }

    /// The `std::io::ErrorKind` behind an I/O failure (`NotFound` callers treat specially).
    #[must_use]
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io(e) => Some(e.kind()),
            _ => None,
        }
    }
}

/// Displays an `io::Error` without repeating its cause (`Is a directory (os error 21)` once).
impl From<io::Error> for FileError {
    fn from(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ELOOP) {
            // O_NOFOLLOW on a symlink fails with ELOOP.
            Self::Symlink
        } else {
            Self::Io(e)
        }
    }
}

/// What kind of non-regular file `t` is, for messages.
fn kind_name(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for writing without following a final symlink (`O_NOFOLLOW`), creating it with
/// `mode` when `create`, and checks on the opened descriptor that it is a regular file.
///
/// # Errors
/// [`FileError::Symlink`] for a symlink, [`FileError::NotRegular`] for a FIFO, device or
/// folder (opened non-blocking, so a FIFO cannot hang the open), I/O errors.
pub fn open_write_nofollow(path: &Path, create: bool, mode: u32) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.write(true).create(create).truncate(false);
    open_nofollow(&options, path, mode)
}

/// Like [`open_write_nofollow`] (always creating), for appending: every write goes to the end.
///
/// # Errors
/// As [`open_write_nofollow`].
pub fn open_append_nofollow(path: &Path, mode: u32) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    open_nofollow(&options, path, mode)
}

/// Opens with `options` (plus read, `mode`, `O_NOFOLLOW`, non-blocking), then refuses anything
/// but a regular file, checked on the opened descriptor.
fn open_nofollow(options: &OpenOptions, path: &Path, mode: u32) -> Result<File, FileError> {
    let file = options
        .clone()
        .read(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    regular(file)
}

fn regular(file: File) -> Result<File, FileError> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular(kind_name(meta.file_type())));
    }
    Ok(file)
}

/// Reads `path` whole, refusing anything but a regular file (checked on the opened descriptor,
/// which is opened non-blocking so a FIFO cannot hang) and anything over `limit` bytes (counted
/// while reading, since a device reports a size of 0).
///
/// # Errors
/// [`FileError::NotRegular`], [`FileError::TooLarge`], I/O errors.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    read_with(path, limit, 0)
}

/// [`read_regular`] for a file virtplan itself writes (a lockfile and its companions): a
/// symlink there was not made by virtplan and is refused on open (`O_NOFOLLOW`), as writing
/// it would be, so `status` never reports another file's contents as progress.
///
/// # Errors
/// [`FileError::Symlink`]; as [`read_regular`].
pub fn read_own(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    read_with(path, limit, libc::O_NOFOLLOW)
}

fn read_with(path: &Path, limit: u64, flags: i32) -> Result<Vec<u8>, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | flags)
        .open(path)
        .map_err(|e| {
            // Only a no-follow open makes ELOOP mean "a symlink is here".
            if flags & libc::O_NOFOLLOW == 0 {
                FileError::Io(e)
            } else {
                FileError::from(e)
            }
        })?;
    let meta = file.metadata().map_err(FileError::Io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular(kind_name(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge {
            limit,
            size: Some(meta.len()),
        });
    }
    // Sized from the metadata: grown from nothing by doubling, a 264 KB plan took five fresh
    // buffers, each faulted in.
    let size = usize::try_from(meta.len()).unwrap_or(0);
    let mut bytes = Vec::with_capacity(size.saturating_add(1));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(FileError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { limit, size: None });
    }
    Ok(bytes)
}

/// [`read_own`] as UTF-8 text.
///
/// # Errors
/// As [`read_own`]; invalid UTF-8 is an `InvalidData` I/O error.
pub fn read_own_text(path: &Path, limit: u64) -> Result<String, FileError> {
    utf8(read_own(path, limit)?)
}

/// [`read_regular`] as UTF-8 text.
///
/// # Errors
/// As [`read_regular`]; invalid UTF-8 is an `InvalidData` I/O error.
pub fn read_regular_text(path: &Path, limit: u64) -> Result<String, FileError> {
    utf8(read_regular(path, limit)?)
}

fn utf8(bytes: Vec<u8>) -> Result<String, FileError> {
    String::from_utf8(bytes)
        .map_err(|e| FileError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// Refuses `path` when it is a symlink (or another non-regular file) that a write would
/// replace; a missing file is fine.
fn check_replaceable(path: &Path) -> Result<(), FileError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(FileError::Symlink),
        Ok(meta) if !meta.file_type().is_file() => {
            Err(FileError::NotRegular(kind_name(meta.file_type())))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FileError::Io(e)),
    }
}

/// Atomically replaces `path` with `bytes`, creating it with Unix permissions `mode`.
///
/// The rename never follows a symlink at `path`, but replacing a link the user placed there
/// would silently cut it, so a symlink (or folder, FIFO, device) there is refused.
///
/// # Errors
/// [`FileError::Symlink`] / [`FileError::NotRegular`] for such a target; I/O errors.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    use std::os::unix::fs::PermissionsExt;
    check_replaceable(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".virtplan-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| FileError::Io(e.error))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinked_lock_pid_is_refused_and_its_target_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("important");
        std::fs::write(&target, "keep me").unwrap();
        let link = dir.path().join("plan.lock.pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_write_nofollow(&link, true, 0o600).unwrap_err();
        assert!(matches!(err, FileError::Symlink), "{err}");
        assert!(err.to_string().contains("symbolic link"));
        let err = write_atomic(&link, b"x", 0o600).unwrap_err();
        assert!(matches!(err, FileError::Symlink), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn fifo_and_devices_are_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("plan.yaml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = read_regular(&fifo, 100).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        let err = read_regular(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(err.to_string().contains("device"), "{err}");
        let err = read_regular(dir.path(), 100).unwrap_err();
        assert!(err.to_string().contains("folder"), "{err}");
        let err = open_write_nofollow(&fifo, true, 0o600).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn bounded_reader_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'a'; 101]).unwrap();
        assert!(matches!(
            read_regular(&path, 100),
            Err(FileError::TooLarge { limit: 100, .. })
        ));
        assert_eq!(read_regular(&path, 101).unwrap().len(), 101);
    }
}
