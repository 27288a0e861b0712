//! Random access: decrypt any byte range by reading only the segments that cover it.

use std::io::{self, Read, Seek, SeekFrom};

use crate::header::read_up_to;
use crate::segment::{FileCipher, SegmentLayout};
use crate::{DataKey, FormatError, UnverifiedHeader};

/// A seekable plaintext view of a ppml file.
///
/// Construction authenticates the header and the final segment (decrypted *as* final), so the
/// plaintext length it reports can be trusted before any other segment is read.
pub struct RandomAccessReader<R: Read + Seek> {
    inner: R,
    cipher: FileCipher,
    layout: SegmentLayout,
    position: u64,
    segment: Vec<u8>,
    segment_index: Option<u64>,
}

impl<R: Read + Seek> RandomAccessReader<R> {
    /// Opens the file in `inner` (any position) with its data key.
    pub fn new(mut inner: R, data_key: &DataKey) -> Result<Self, FormatError> {
        inner.seek(SeekFrom::Start(0))?;
        let header = UnverifiedHeader::read_from(&mut inner)?;
        let header_len = header.len() as u64;
        let (header, cipher) = header.verify(data_key)?;
        let file_len = inner.seek(SeekFrom::End(0))?;
        let layout = SegmentLayout::new(header_len, header.segment_size(), file_len)?;
        let mut reader = RandomAccessReader {
            inner,
            cipher,
            layout,
            position: 0,
            segment: Vec::new(),
            segment_index: None,
        };
        reader.load_segment(layout.segment_count() - 1)?;
        Ok(reader)
    }

    /// Plaintext length of the file (authenticated).
    pub fn plaintext_len(&self) -> u64 {
        self.layout.plaintext_len()
    }

    fn load_segment(&mut self, index: u64) -> Result<(), FormatError> {
        if self.segment_index == Some(index) {
            return Ok(());
        }
        self.segment_index = None;
        let range = self.layout.ciphertext_range(index);
        self.segment.resize((range.end - range.start) as usize, 0);
        self.inner.seek(SeekFrom::Start(range.start))?;
        if read_up_to(&mut self.inner, &mut self.segment)? != self.segment.len() {
            return Err(FormatError::BadLength(
                "the file shrank while being read".into(),
            ));
        }
        let plaintext_len = self
            .cipher
            .open(index, self.layout.is_last(index), &mut self.segment)?
            .len();
        self.segment.truncate(plaintext_len);
        self.segment_index = Some(index);
        Ok(())
    }

    /// Reads plaintext at `offset` into `out`; returns the bytes read (0 at end of file).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<usize, FormatError> {
        if offset >= self.plaintext_len() || out.is_empty() {
            return Ok(0);
        }
        let index = offset / self.layout.segment_size();
        self.load_segment(index)?;
        let within = (offset - self.layout.plaintext_offset(index)) as usize;
        let n = out.len().min(self.segment.len() - within);
        out[..n].copy_from_slice(&self.segment[within..within + n]);
        Ok(n)
    }
}

impl<R: Read + Seek> Read for RandomAccessReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self
            .read_at(self.position, out)
            .map_err(FormatError::into_io)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for RandomAccessReader<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.plaintext_len().checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            )
        })?;
        self.position = target;
        Ok(target)
    }
}
