//! Write buffering that keeps writes to a file page-aligned.

use std::io::{self, Write};

/// Buffers writes and passes them on in pieces of exactly its capacity (a multiple of the
/// page size), so that every write it makes, but the last, starts and ends on a page boundary
/// of a file written from offset 0.
///
/// `std::io::BufWriter` passes on whatever it holds when the next write does not fit, so
/// writes of 64 KiB + 16 bytes (one encrypted segment) through it, or straight to the file,
/// land at unaligned offsets, and a write that covers part of a page costs the kernel more
/// (per-block state for the page on ext4). Writing encrypted parts through this writer made
/// `ppml encrypt` about a fifth faster here; copying a segment into the buffer measured
/// faster than sealing segments in place in one large buffer.
pub struct AlignedWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    capacity: usize,
}

/// The capacity of [`AlignedWriter::new`]: 256 KiB, which keeps a writer's working set in
/// the L2 cache (measured faster than 1 MiB for `ppml encrypt` and `decrypt`).
pub const DEFAULT_CAPACITY: usize = 256 << 10;
const PAGE: usize = 4096;

impl<W: Write> AlignedWriter<W> {
    /// A writer with a [`DEFAULT_CAPACITY`] buffer.
    pub fn new(inner: W) -> Self {
        Self::with_capacity(DEFAULT_CAPACITY, inner)
    }

    /// A writer whose buffer holds `capacity` bytes, rounded up to a multiple of 4096.
    pub fn with_capacity(capacity: usize, inner: W) -> Self {
        let capacity = capacity.max(1).next_multiple_of(PAGE);
        AlignedWriter {
            inner,
            buf: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// The wrapped writer (for example a file, to reserve space for it).
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes what is buffered and returns the wrapped writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.write_buffered()?;
        Ok(self.inner)
    }

    fn write_buffered(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl<W: Write> Write for AlignedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= self.capacity {
            // Whole buffers' worth straight through, without a copy.
            let whole = data.len() / self.capacity * self.capacity;
            self.inner.write_all(&data[..whole])?;
            return Ok(whole);
        }
        let take = (self.capacity - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == self.capacity {
            self.write_buffered()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_buffered()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the length of every write it receives.
    #[derive(Default)]
    struct Recorder {
        data: Vec<u8>,
        writes: Vec<usize>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.data.extend_from_slice(buf);
            self.writes.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn passes_everything_on_in_whole_buffers() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = AlignedWriter::with_capacity(5000, Recorder::default());
        assert_eq!(writer.capacity, 8192);
        let mut at = 0;
        for piece in [221, 65_552, 3, 20_000, 8192, 1] {
            writer.write_all(&data[at..at + piece]).unwrap();
            at += piece;
        }
        writer.write_all(&data[at..]).unwrap();
        let recorder = writer.into_inner().unwrap();
        assert_eq!(recorder.data, data);
        let (last, whole) = recorder.writes.split_last().unwrap();
        assert!(whole.iter().all(|n| n % 8192 == 0), "{whole:?}");
        assert!(*last > 0);
    }
}
