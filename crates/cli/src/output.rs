//! Output files that appear only when complete.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ppml_engine::dataset::{replace_path, temp_sibling};

/// A file written to a hidden temporary sibling and renamed into place by
/// [`AtomicFile::commit`]. Dropped without commit, the temporary file is deleted, so a failed
/// command leaves neither partial output nor stray plaintext behind.
pub struct AtomicFile {
    destination: PathBuf,
    temp: Option<PathBuf>,
    writer: Option<BufWriter<File>>,
    overwrite: bool,
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
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            temp: Some(temp),
            overwrite,
        })
    }

    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("not committed");
        let file = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", self.destination.display()))?;
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
        self.writer.as_mut().expect("not committed").write(buf)
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
