//! Output files that appear only when complete.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ppml_engine::aligned_writer::AlignedWriter;
use ppml_engine::dataset::{replace_path, temp_sibling};

/// A file written to a hidden temporary sibling and renamed into place by
/// [`AtomicFile::commit`]. Dropped without commit, the temporary file is deleted, so a failed
/// command leaves neither partial output nor stray plaintext behind.
pub struct AtomicFile {
    destination: PathBuf,
    temp: Option<PathBuf>,
    writer: Option<AlignedWriter<File>>,
    overwrite: bool,
    /// Bytes written so far, and the length reserved by [`AtomicFile::preallocate`].
    written: u64,
    allocated: u64,
}

impl AtomicFile {
    pub fn create(destination: &Path, overwrite: bool) -> Result<Self> {
        if destination.exists() && !overwrite {
            bail!(
                "{}: output already exists (remove it or pass --overwrite)",
                destination.display()
            );
        }
        let temp = temp_sibling(destination);
        let file =
            File::create_new(&temp).with_context(|| format!("creating {}", temp.display()))?;
        Ok(AtomicFile {
            destination: destination.to_path_buf(),
            writer: Some(AlignedWriter::new(file)),
            temp: Some(temp),
            overwrite,
            written: 0,
            allocated: 0,
        })
    }

    /// Reserves space for `len` bytes up front (see [`ppml_engine::dataset::preallocate`]);
    /// `commit` trims the file to what was actually written.
    pub fn preallocate(&mut self, len: u64) -> Result<()> {
        let writer = self.writer.as_ref().expect("not committed");
        ppml_engine::dataset::preallocate(writer.get_ref(), len)
            .with_context(|| format!("reserving {len} bytes for {}", self.destination.display()))?;
        self.allocated = len;
        Ok(())
    }

    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("not committed");
        let file = writer
            .into_inner()
            .with_context(|| format!("writing {}", self.destination.display()))?;
        if self.written < self.allocated {
            file.set_len(self.written)
                .with_context(|| format!("writing {}", self.destination.display()))?;
        }
        ppml_engine::dataset::sync(&file)
            .with_context(|| format!("syncing {}", self.destination.display()))?;
        let temp = self.temp.take().expect("not committed");
        if let Err(e) = replace_path(&temp, &self.destination, self.overwrite) {
            let _ = std::fs::remove_file(&temp);
            return Err(e.into());
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
