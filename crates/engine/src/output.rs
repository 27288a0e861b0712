//! Output files that appear only when complete.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::aligned_writer::AlignedWriter;
use crate::dataset::{Durability, replace_path, temp_sibling};
use crate::{EngineError, Result};

/// A file written to a hidden temporary sibling and renamed into place by
/// [`AtomicFile::commit`]. Dropped without commit, the temporary file is deleted, so a failed
/// command leaves neither partial output nor stray plaintext behind.
pub struct AtomicFile {
    destination: PathBuf,
    temp: Option<PathBuf>,
    writer: Option<AlignedWriter<File>>,
    overwrite: bool,
    durability: Durability,
    /// Bytes written so far, and the length reserved by [`AtomicFile::preallocate`].
    written: u64,
    allocated: u64,
}

impl AtomicFile {
    /// Starts writing `destination`; refuses an existing one unless `overwrite`.
    pub fn create(destination: &Path, overwrite: bool, durability: Durability) -> Result<Self> {
        if destination.exists() && !overwrite {
            return Err(EngineError::OutputExists(destination.display().to_string()));
        }
        let temp = temp_sibling(destination);
        let file = File::create_new(&temp).map_err(|e| EngineError::io(&temp, e))?;
        Ok(AtomicFile {
            destination: destination.to_path_buf(),
            writer: Some(AlignedWriter::new(file)),
            temp: Some(temp),
            overwrite,
            durability,
            written: 0,
            allocated: 0,
        })
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

    /// Writes what is buffered, syncs (unless [`Durability::NoSync`]) and renames the file
    /// into place.
    pub fn commit(mut self) -> Result<()> {
        let io = |e| EngineError::io(&self.destination, e);
        let writer = self.writer.take().expect("not committed");
        let file = writer.into_inner().map_err(io)?;
        if self.written < self.allocated {
            file.set_len(self.written).map_err(io)?;
        }
        self.durability.sync(&file).map_err(io)?;
        let temp = self.temp.take().expect("not committed");
        if let Err(e) = replace_path(&temp, &self.destination, self.overwrite, self.durability) {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(())
    }
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
        if let Some(temp) = self.temp.take() {
            self.writer.take();
            let _ = std::fs::remove_file(temp);
        }
    }
}
