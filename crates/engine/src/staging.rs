//! Hidden staging siblings of an output, and the sweep that removes those whose writer died.
//!
//! An output that cannot be written unnamed (a dataset directory, a directory of plaintext
//! files at its commit, a file that replaces another) is staged beside its destination under
//! the hidden name `.NAME.ppml-tmp-HEX` and renamed into place when complete. Its writer holds
//! an exclusive `flock(2)` on the staging entry for as long as the entry is in use; the kernel
//! drops that lock when the process ends, however it ends. The next writer of the same
//! destination removes every staging sibling of that destination whose lock it can take
//! ([`sweep_stale`]), so what a SIGKILL leaves behind (ciphertext parts, or the complete files
//! of a directory output killed between their naming and the rename) lasts only until that
//! output is written again.
//!
//! `flock` is the liveness test because it needs no process ids (which are reused and mean
//! nothing across containers sharing a volume) and no clocks: a lock is held exactly while
//! some process has the entry open for staging. An entry cannot be created and locked in one
//! step, so writers create and lock theirs under a shared `flock` of the parent directory and
//! a sweep holds it exclusively: a sweep never sees an entry that is not yet locked.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::{EngineError, Result};

/// What follows `.NAME` in a staging sibling's name, before its random part.
const STAGING_MARK: &str = ".ppml-tmp-";
/// Random bytes in a staging name (written as twice as many hex digits).
const STAGING_RANDOM_BYTES: usize = 6;

/// A new staging path for `destination`: `.NAME.ppml-tmp-HEX` in the same directory (so a
/// rename is atomic), with 12 random hex digits.
pub fn temp_sibling(destination: &Path) -> PathBuf {
    let mut random = [0u8; STAGING_RANDOM_BYTES];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    destination.with_file_name(format!(
        "{}{}",
        staging_prefix(destination),
        crate::hex_lower(&random)
    ))
}

/// `.NAME.ppml-tmp-` for `destination`'s file name `NAME`.
fn staging_prefix(destination: &Path) -> String {
    let name = destination
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    format!(".{name}{STAGING_MARK}")
}

/// Whether `name` is a staging name of the destination whose prefix is `prefix`: the prefix
/// then exactly 12 lowercase hex digits.
fn is_staging_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|random| {
        random.len() == 2 * STAGING_RANDOM_BYTES
            && random
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The directory a new file at `path` goes in.
pub(crate) fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Takes the exclusive staging lock on `file`, waiting for a sweeper that holds it.
pub(crate) fn lock(file: &impl AsFd) -> io::Result<()> {
    rustix::fs::flock(file, FlockOperation::LockExclusive).map_err(io::Error::from)
}

/// Whether `path` still names the file open as `file` (same device and inode).
fn still_named(path: &Path, file: &File) -> bool {
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
        _ => false,
    }
}

/// How many fresh staging names a writer tries when the name it drew exists.
const STAGING_ATTEMPTS: usize = 8;

/// Opens the directory `destination` goes in and locks it: shared by writers while they make
/// and lock a staging entry, exclusive by a sweep. A sweep therefore never sees an entry
/// between its creation and its writer's lock.
fn lock_parent(destination: &Path, operation: FlockOperation) -> io::Result<File> {
    let dir = File::from(rustix::fs::open(
        parent_of(destination),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    rustix::fs::flock(&dir, operation)?;
    Ok(dir)
}

/// Creates a staging entry for `destination` with `make` and locks it, under the shared lock
/// of the parent directory (so no sweep runs in between); then it is the writer's until the
/// returned handle is closed.
fn create_locked(
    destination: &Path,
    make: impl Fn(&Path) -> io::Result<File>,
) -> Result<(PathBuf, File)> {
    // Where the parent cannot be opened for reading (no read permission), no sweep can run
    // there either (it needs the exclusive lock).
    let _parent = lock_parent(destination, FlockOperation::LockShared);
    for _ in 0..STAGING_ATTEMPTS {
        let path = temp_sibling(destination);
        let file = match make(&path) {
            Ok(file) => file,
            // 48 random bits: a collision is only ever another run's leftover.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(EngineError::io(&path, e)),
        };
        lock(&file).map_err(|e| EngineError::io(&path, e))?;
        return Ok((path, file));
    }
    Err(EngineError::io(
        destination,
        io::Error::new(io::ErrorKind::AlreadyExists, "no free staging name"),
    ))
}

/// A hidden directory that stages `destination` (in its directory, which must exist), locked
/// against [`sweep_stale`] while this value lives.
pub(crate) struct StagingDir {
    path: PathBuf,
    _lock: File,
}

impl StagingDir {
    pub(crate) fn create(destination: &Path) -> Result<StagingDir> {
        use std::os::unix::fs::DirBuilderExt as _;
        let (path, lock) = create_locked(destination, |path| {
            std::fs::DirBuilder::new().mode(0o700).create(path)?;
            File::open(path)
        })?;
        Ok(StagingDir { path, _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A new hidden file that stages `destination` (readable and writable by its owner only),
/// locked against [`sweep_stale`] while the returned file stays open.
pub(crate) fn create_staging_file(destination: &Path) -> Result<(PathBuf, File)> {
    create_locked(destination, |path| {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    })
}

/// Removes the staging siblings of `destination` that no living writer holds: those left by a
/// writer that was killed, or a destination moved aside by an overwrite that was killed before
/// it removed it. Returns how many it removed. Errors are not fatal (a sibling that cannot be
/// opened or removed stays, and is logged): the sweep only tidies up.
pub fn sweep_stale(destination: &Path) -> usize {
    let prefix = staging_prefix(destination);
    let Ok(_parent) = lock_parent(destination, FlockOperation::LockExclusive) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(parent_of(destination)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|name| is_staging_name(name, &prefix))
        {
            continue;
        }
        // A symbolic link or anything but a file or directory is not ppml's.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() && !kind.is_file() {
            continue;
        }
        let path = entry.path();
        match remove_if_unlocked(&path, kind.is_dir()) {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!("{}: not removed: {e}", path.display()),
        }
    }
    if removed > 0 {
        tracing::info!(
            "{}: removed {removed} staging entr{} left by a writer that did not finish",
            destination.display(),
            if removed == 1 { "y" } else { "ies" }
        );
    }
    removed
}

/// Removes the staging entry at `path` if no writer holds its lock; `Ok(false)` if one does.
fn remove_if_unlocked(path: &Path, is_dir: bool) -> io::Result<bool> {
    // O_NOFOLLOW: an entry swapped for a symbolic link since it was listed is not followed;
    // O_NONBLOCK: opening never waits (it does not change how the file is read).
    let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    if is_dir {
        flags |= OFlags::DIRECTORY;
    }
    let file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    if !still_named(path, &file) {
        return Ok(false);
    }
    let result = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The sorted names in `dir`, hidden ones included.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn staging_names_are_recognised_exactly() {
        let prefix = staging_prefix(Path::new("/x/out.csv"));
        assert_eq!(prefix, ".out.csv.ppml-tmp-");
        let made = temp_sibling(Path::new("/x/out.csv"));
        assert!(is_staging_name(
            made.file_name().unwrap().to_str().unwrap(),
            &prefix
        ));
        for other in [
            ".out.csv.ppml-tmp-",
            ".out.csv.ppml-tmp-0123456789a",
            ".out.csv.ppml-tmp-0123456789abc",
            ".out.csv.ppml-tmp-0123456789AB",
            ".out.csv.ppml-tmp-0123456789a/",
            ".out.csv.x.ppml-tmp-0123456789ab",
            "out.csv.ppml-tmp-0123456789ab",
        ] {
            assert!(!is_staging_name(other, &prefix), "{other}");
        }
        assert!(is_staging_name(".out.csv.ppml-tmp-0123456789ab", &prefix));
    }

    #[test]
    fn only_unlocked_staging_of_the_destination_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Left by dead writers: a directory with a file in it, and a file.
        let dead_dir = dir.path().join(".out.ppml-tmp-00000000000a");
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("part-00000.csv"), b"complete plaintext").unwrap();
        std::fs::write(dir.path().join(".out.ppml-tmp-00000000000b"), b"x").unwrap();
        // Held by living writers.
        let live_dir = StagingDir::create(&out).unwrap();
        let (live_file, _held) = create_staging_file(&out).unwrap();
        // Not this destination's, or not a staging name, or a link.
        std::fs::create_dir(dir.path().join(".other.ppml-tmp-00000000000c")).unwrap();
        std::fs::write(dir.path().join(".out.ppml-tmp-keep"), b"x").unwrap();
        std::fs::write(dir.path().join("target"), b"x").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("target"),
            dir.path().join(".out.ppml-tmp-00000000000d"),
        )
        .unwrap();

        assert_eq!(sweep_stale(&out), 2);
        let mut expected = vec![
            ".other.ppml-tmp-00000000000c".to_string(),
            ".out.ppml-tmp-00000000000d".to_string(),
            ".out.ppml-tmp-keep".to_string(),
            "target".to_string(),
            live_dir
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into(),
            live_file.file_name().unwrap().to_string_lossy().into(),
        ];
        expected.sort();
        assert_eq!(names(dir.path()), expected);

        // A writer's lock goes with its handle.
        let live_dir_name: String = live_dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into();
        drop(live_dir);
        assert_eq!(sweep_stale(&out), 1);
        expected.retain(|name| *name != live_dir_name);
        assert_eq!(names(dir.path()), expected);
    }

    #[test]
    fn a_planted_staging_directory_cannot_make_the_sweep_delete_elsewhere() {
        // Whoever can write beside the destination can plant a staging-named directory
        // holding links out of it: the sweep removes the links, never what they point at.
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"not ppml's").unwrap();
        let out = dir.path().join("out");
        let planted = dir.path().join(".out.ppml-tmp-0123456789ab");
        std::fs::create_dir(&planted).unwrap();
        std::os::unix::fs::symlink(&outside, planted.join("dir-link")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), planted.join("file-link")).unwrap();
        assert_eq!(sweep_stale(&out), 1);
        assert!(!planted.exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"not ppml's");
    }

    #[test]
    fn a_sweep_never_takes_a_staging_directory_from_its_writer() {
        // Writers create and lock while a sweeper runs beside them: every staging directory a
        // writer got must still be there while it holds it (without the parent's lock, the
        // sweeper takes some between their creation and their lock).
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (out, stop) = (out.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut removed = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    removed += sweep_stale(&out);
                }
                removed
            })
        };
        for _ in 0..500 {
            let staging = StagingDir::create(&out).unwrap();
            std::fs::write(staging.path().join("part"), b"x").unwrap();
            assert!(staging.path().join("part").exists());
            // Released without being renamed into place, as by a killed writer.
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let removed = sweeper.join().unwrap();
        assert!(removed > 0, "the sweeper ran beside the writers");
        sweep_stale(&out);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }
}
