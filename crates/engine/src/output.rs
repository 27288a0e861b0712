//! Output files and directories that appear only when complete.
//!
//! Plaintext is written to *unnamed* files (Linux `O_TMPFILE`) in the destination's directory
//! and given a name only once complete, so a process killed at any point, even by SIGKILL,
//! leaves no partial output and no plaintext on disk: the kernel frees an unnamed file when
//! its last descriptor closes. Where the filesystem has no unnamed files (or `/proc`, which
//! naming one needs), a hidden named sibling takes their place; it is removed on every error
//! and on drop.
//!
//! What a rename must publish (a directory of files, or a file that replaces another) is named
//! first in a hidden staging sibling ([`crate::staging`]), and a SIGKILL between that and the
//! rename leaves it there, complete. Such leftovers, and the fallback's after a SIGKILL, are
//! removed by the next writer of the same destination ([`crate::staging::sweep_stale`]).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use crate::aligned_writer::AlignedWriter;
use crate::dataset::{Durability, replace_path};
use crate::staging::{StagingDir, create_staging_file, parent_of, sweep_stale, temp_sibling};
use crate::{EngineError, Result};

/// An unnamed file (`O_TMPFILE`) in `dir`, or `None` where the kernel or filesystem has none
/// or `/proc` (to name it later) is missing.
fn open_unnamed(dir: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    rustix::fs::openat(
        rustix::fs::CWD,
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .ok()
    .map(File::from)
}

/// Gives the unnamed `file` the name `path` (which must not exist).
fn name_unnamed(file: &File, path: &Path) -> io::Result<()> {
    let by_descriptor = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        by_descriptor.as_str(),
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

/// A file of the output until commit: unnamed, or (fallback) at a hidden temporary path.
enum Pending {
    Unnamed,
    Named(PathBuf),
}

/// Opens the pending form of a new file that will be named `destination`'s sibling, locked
/// against [`sweep_stale`] from the start (an unnamed file may be named in staging later).
fn open_pending(destination: &Path) -> Result<(File, Pending)> {
    if let Some(file) = open_unnamed(parent_of(destination)) {
        crate::staging::lock(&file).map_err(|e| EngineError::io(destination, e))?;
        return Ok((file, Pending::Unnamed));
    }
    let (temp, file) = create_staging_file(destination)?;
    Ok((file, Pending::Named(temp)))
}

/// A new file readable and writable by its owner only.
fn create_private(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| EngineError::io(path, e))
}

/// A file that appears at its destination only when complete ([`AtomicFile::commit`]). Until
/// then it is unnamed (see the module documentation); dropped without commit, nothing of it
/// remains.
pub struct AtomicFile {
    destination: PathBuf,
    pending: Option<Pending>,
    writer: Option<AlignedWriter<File>>,
    overwrite: bool,
    durability: Durability,
    /// Bytes written so far, and the length reserved by [`AtomicFile::preallocate`].
    written: u64,
    allocated: u64,
}

impl AtomicFile {
    /// Starts writing `destination`; refuses an existing one unless `overwrite`. Removes what
    /// killed writers of `destination` left ([`sweep_stale`]).
    pub fn create(destination: &Path, overwrite: bool, durability: Durability) -> Result<Self> {
        if destination.exists() && !overwrite {
            return Err(EngineError::OutputExists(destination.display().to_string()));
        }
        sweep_stale(destination);
        let (file, pending) = open_pending(destination)?;
        Ok(AtomicFile {
            destination: destination.to_path_buf(),
            writer: Some(AlignedWriter::new(file)),
            pending: Some(pending),
            overwrite,
            durability,
            written: 0,
            allocated: 0,
        })
    }

    /// Whether the file is unnamed until commit (false on filesystems without `O_TMPFILE`).
    pub fn is_unnamed(&self) -> bool {
        matches!(self.pending, Some(Pending::Unnamed))
    }

    /// Reserves space for `len` bytes up front (see [`crate::dataset::preallocate`]);
    /// `commit` trims the file to what was actually written.
    pub fn preallocate(&mut self, len: u64) -> Result<()> {
        let writer = self.writer.as_ref().expect("not committed");
        crate::dataset::preallocate(writer.get_ref(), len)
            .map_err(|e| EngineError::io(&self.destination, e))?;
        self.allocated = len;
        Ok(())
    }

    /// Writes what is buffered, syncs (unless [`Durability::NoSync`]) and gives the file its
    /// name (replacing an existing one only with `overwrite`).
    pub fn commit(mut self) -> Result<()> {
        let io = |e| EngineError::io(&self.destination, e);
        let writer = self.writer.take().expect("not committed");
        let file = writer.into_inner().map_err(io)?;
        if self.written < self.allocated {
            file.set_len(self.written).map_err(io)?;
        }
        self.durability.sync(&file).map_err(io)?;
        let temp = match self.pending.take().expect("not committed") {
            Pending::Named(temp) => temp,
            Pending::Unnamed if !self.overwrite => {
                // linkat never replaces: a destination created meanwhile is not clobbered.
                return match name_unnamed(&file, &self.destination) {
                    Ok(()) => {
                        sync_parent(&self.destination, self.durability);
                        Ok(())
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(
                        EngineError::OutputExists(self.destination.display().to_string()),
                    ),
                    Err(e) => Err(io(e)),
                };
            }
            Pending::Unnamed => {
                let temp = temp_sibling(&self.destination);
                name_unnamed(&file, &temp).map_err(io)?;
                temp
            }
        };
        if let Err(e) = replace_path(&temp, &self.destination, self.overwrite, self.durability) {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(())
    }
}

fn sync_parent(path: &Path, durability: Durability) {
    let _ = File::open(parent_of(path)).and_then(|d| durability.sync(&d));
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.writer.as_mut().expect("not committed").write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(Pending::Named(temp)) = self.pending.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// A directory of files that appears at its destination only when every file is complete
/// ([`AtomicDir::commit`]). Its files stay unnamed until then and are linked into a hidden
/// sibling directory that is renamed into place, so a process killed while writing them
/// leaves nothing (see the module documentation).
pub struct AtomicDir {
    destination: PathBuf,
    /// The hidden sibling the files are named in (created at commit, or at the first file
    /// where files cannot be unnamed).
    temp: Option<StagingDir>,
    unnamed: Vec<(String, File)>,
    overwrite: bool,
    durability: Durability,
}

impl AtomicDir {
    /// Starts writing the directory `destination`; refuses an existing one unless
    /// `overwrite`. Removes what killed writers of `destination` left ([`sweep_stale`]).
    pub fn create(destination: &Path, overwrite: bool, durability: Durability) -> Result<Self> {
        if destination.exists() && !overwrite {
            return Err(EngineError::OutputExists(destination.display().to_string()));
        }
        sweep_stale(destination);
        Ok(AtomicDir {
            destination: destination.to_path_buf(),
            temp: None,
            unnamed: Vec::new(),
            overwrite,
            durability,
        })
    }

    /// Where the directory appears.
    pub fn destination(&self) -> &Path {
        &self.destination
    }

    /// The staging directory, created (and locked) on first use.
    fn staging(&mut self) -> Result<&Path> {
        if self.temp.is_none() {
            self.temp = Some(StagingDir::create(&self.destination)?);
        }
        Ok(self.temp.as_ref().expect("just created").path())
    }

    /// A new file `name` of the directory, to write (and sync) before [`AtomicDir::commit`].
    pub fn create_file(&mut self, name: &str) -> Result<File> {
        if let Some(file) = open_unnamed(parent_of(&self.destination)) {
            let handle = file
                .try_clone()
                .map_err(|e| EngineError::io(&self.destination, e))?;
            self.unnamed.push((name.to_string(), file));
            return Ok(handle);
        }
        let path = self.staging()?.join(name);
        create_private(&path)
    }

    /// Names every file and moves the directory into place (replacing an existing one only
    /// with `overwrite`). The files must have been synced by their writers.
    ///
    /// Between the first name and the rename, the complete files are in the hidden sibling:
    /// that window is kept to the link calls and the rename (the directory is synced after
    /// the rename, under its final name), so a SIGKILL lands in it only by a narrow chance,
    /// and what it leaves is removed by the next writer of the destination. Filesystems that
    /// journal metadata in order (ext4, XFS) never show the renamed directory without the
    /// entries linked before it.
    pub fn commit(mut self) -> Result<()> {
        let temp = self.staging()?.to_path_buf();
        for (name, file) in std::mem::take(&mut self.unnamed) {
            let path = temp.join(&name);
            name_unnamed(&file, &path).map_err(|e| EngineError::io(&path, e))?;
        }
        replace_path(&temp, &self.destination, self.overwrite, self.durability)?;
        // Now the destination: not staging to remove on drop (its lock goes with it).
        self.temp = None;
        File::open(&self.destination)
            .and_then(|d| self.durability.sync(&d))
            .map_err(|e| EngineError::io(&self.destination, e))
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_dir_all(temp.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::tests::names;

    #[test]
    fn an_atomic_file_is_nowhere_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.csv");
        let mut file = AtomicFile::create(&out, false, Durability::NoSync).unwrap();
        assert!(file.is_unnamed(), "tmpfs and ext4 have O_TMPFILE");
        file.write_all(b"secret row\n").unwrap();
        file.flush().unwrap();
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        file.commit().unwrap();
        assert_eq!(names(dir.path()), ["out.csv"]);
        assert_eq!(std::fs::read(&out).unwrap(), b"secret row\n");

        // Dropped uncommitted: nothing; existing output kept unless overwriting.
        let mut file =
            AtomicFile::create(&dir.path().join("gone"), false, Durability::NoSync).unwrap();
        file.write_all(b"x").unwrap();
        drop(file);
        assert_eq!(names(dir.path()), ["out.csv"]);
        assert!(matches!(
            AtomicFile::create(&out, false, Durability::NoSync),
            Err(EngineError::OutputExists(_))
        ));
        let mut file = AtomicFile::create(&out, true, Durability::NoSync).unwrap();
        file.write_all(b"new").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["out.csv"]);
    }

    #[test]
    fn a_destination_made_meanwhile_is_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.csv");
        let mut file = AtomicFile::create(&out, false, Durability::NoSync).unwrap();
        file.write_all(b"mine").unwrap();
        std::fs::write(&out, b"theirs").unwrap();
        assert!(matches!(file.commit(), Err(EngineError::OutputExists(_))));
        assert_eq!(std::fs::read(&out).unwrap(), b"theirs");
        assert_eq!(names(dir.path()), ["out.csv"]);
    }

    #[test]
    fn an_atomic_dir_is_nowhere_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plain");
        let mut atomic = AtomicDir::create(&out, false, Durability::NoSync).unwrap();
        for name in ["part-00000.csv", "part-00001.csv"] {
            let mut file = atomic.create_file(name).unwrap();
            file.write_all(name.as_bytes()).unwrap();
        }
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        atomic.commit().unwrap();
        assert_eq!(names(dir.path()), ["plain"]);
        assert_eq!(names(&out), ["part-00000.csv", "part-00001.csv"]);
        assert_eq!(
            std::fs::read(out.join("part-00001.csv")).unwrap(),
            b"part-00001.csv"
        );

        let mut atomic =
            AtomicDir::create(&dir.path().join("gone"), false, Durability::NoSync).unwrap();
        atomic.create_file("a").unwrap().write_all(b"x").unwrap();
        drop(atomic);
        assert_eq!(names(dir.path()), ["plain"]);
    }

    #[test]
    fn what_a_killed_writer_left_is_removed_by_the_next_writer() {
        // A directory output killed between naming its files and the rename leaves them in
        // its staging directory, its lock gone with the process.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plain");
        let left = dir.path().join(".plain.ppml-tmp-0123456789ab");
        std::fs::create_dir(&left).unwrap();
        std::fs::write(left.join("part-00000.csv"), b"complete rows").unwrap();
        // An overwrite killed after moving the old output aside.
        std::fs::write(dir.path().join(".plain.ppml-tmp-ba9876543210"), b"old").unwrap();
        let mut atomic = AtomicDir::create(&out, false, Durability::NoSync).unwrap();
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        atomic.create_file("a").unwrap().write_all(b"x").unwrap();
        atomic.commit().unwrap();
        assert_eq!(names(dir.path()), ["plain"]);

        let out = dir.path().join("out.csv");
        std::fs::write(dir.path().join(".out.csv.ppml-tmp-0123456789ab"), b"rows").unwrap();
        let file = AtomicFile::create(&out, false, Durability::NoSync).unwrap();
        assert_eq!(names(dir.path()), ["plain"]);
        file.commit().unwrap();
        assert_eq!(names(dir.path()), ["out.csv", "plain"]);
    }
}
