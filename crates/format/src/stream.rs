//! Sequential encryption and decryption (the STREAM construction over segments).

use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;

use crate::header::{read_up_to, sha256};
use crate::segment::{FileCipher, TAG_LEN};
use crate::{DataKey, FormatError, Header, UnverifiedHeader};

/// What a finished file looks like, for the dataset manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedFile {
    /// Plaintext bytes written.
    pub plaintext_len: u64,
    /// Bytes of the encrypted file, header included.
    pub ciphertext_len: u64,
    /// SHA-256 of the header bytes.
    pub header_sha256: [u8; 32],
}

/// Encrypts everything written to it into `inner` as one ppml file.
///
/// The header is written at construction. A segment is sealed only when the next byte arrives
/// (or on [`EncryptingWriter::finish`]), so the final segment is always marked final. Dropping
/// the writer without calling `finish` leaves a file that every reader rejects as truncated.
pub struct EncryptingWriter<W: Write> {
    inner: W,
    cipher: FileCipher,
    next_index: u64,
    buf: Vec<u8>,
    /// A sealed segment, when one was sealed straight from the caller's data.
    sealed: Option<Vec<u8>>,
    plaintext_len: u64,
    ciphertext_len: u64,
    header_len: u64,
    header_sha256: [u8; 32],
}

impl<W: Write> EncryptingWriter<W> {
    /// Writes `header` to `inner` and returns a writer for the file's plaintext.
    pub fn new(mut inner: W, header: &Header, data_key: &DataKey) -> Result<Self, FormatError> {
        let cipher = header.cipher(data_key);
        let encoded = header.encode(&cipher);
        inner.write_all(&encoded)?;
        let segment_size = cipher.segment_size();
        Ok(EncryptingWriter {
            inner,
            next_index: 0,
            buf: Vec::with_capacity(segment_size + TAG_LEN),
            sealed: None,
            plaintext_len: 0,
            ciphertext_len: encoded.len() as u64,
            header_len: encoded.len() as u64,
            header_sha256: sha256(&encoded),
            cipher,
        })
    }

    /// The length the whole file will have once `plaintext_len` bytes in all were written.
    pub fn file_len_for(&self, plaintext_len: u64) -> u64 {
        let segments = plaintext_len
            .div_ceil(self.cipher.segment_size() as u64)
            .max(1);
        self.header_len + plaintext_len + segments * TAG_LEN as u64
    }

    fn seal_buffered(&mut self, last: bool) -> io::Result<()> {
        self.cipher.seal(self.next_index, last, &mut self.buf);
        self.inner.write_all(&self.buf)?;
        self.ciphertext_len += self.buf.len() as u64;
        self.buf.clear();
        self.next_index += 1;
        Ok(())
    }

    /// The inner writer, for example to wait for its buffers to drain between writes. Writing
    /// to it directly would corrupt the file.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Seals the final segment, flushes, and returns the inner writer with the file's sizes.
    pub fn finish(mut self) -> Result<(W, FinishedFile), FormatError> {
        self.seal_buffered(true)?;
        self.inner.flush()?;
        let finished = FinishedFile {
            plaintext_len: self.plaintext_len,
            ciphertext_len: self.ciphertext_len,
            header_sha256: self.header_sha256,
        };
        Ok((self.inner, finished))
    }
}

impl<W: Write> Write for EncryptingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let segment_size = self.cipher.segment_size();
        let mut rest = data;
        while !rest.is_empty() {
            if self.buf.len() == segment_size {
                self.seal_buffered(false)?;
            }
            if self.buf.is_empty() && rest.len() > segment_size {
                // A whole segment with more data after it (so not the final one): seal it
                // straight from `data`.
                let (segment, more) = rest.split_at(segment_size);
                let sealed = self
                    .sealed
                    .get_or_insert_with(|| vec![0; segment_size + TAG_LEN]);
                self.cipher
                    .seal_into(self.next_index, false, segment, sealed);
                self.inner.write_all(sealed)?;
                self.ciphertext_len += sealed.len() as u64;
                self.next_index += 1;
                rest = more;
                continue;
            }
            let take = (segment_size - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        self.plaintext_len += data.len() as u64;
        Ok(data.len())
    }

    /// Flushes the inner writer. Buffered plaintext stays buffered until its segment is full.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts a ppml file sequentially, releasing each segment's plaintext only after that
/// segment authenticated. Reading to the end succeeds only if the final segment was found.
pub struct DecryptingReader<R: Read> {
    inner: R,
    cipher: Arc<FileCipher>,
    next_index: u64,
    buf: Vec<u8>,
    plain: std::ops::Range<usize>,
    carry: Option<u8>,
    done: bool,
}

impl<R: Read> DecryptingReader<R> {
    /// Verifies `header` with `data_key` and decrypts the segments that follow in `inner`
    /// (positioned right after the header).
    pub fn new(
        inner: R,
        header: UnverifiedHeader,
        data_key: &DataKey,
    ) -> Result<Self, FormatError> {
        let (_, cipher) = header.verify(data_key)?;
        Ok(Self::from_verified(inner, Arc::new(cipher)))
    }

    /// Decrypts the segments in `inner` (positioned right after the header) with the keys of a
    /// header that was already verified.
    pub fn from_verified(inner: R, cipher: Arc<FileCipher>) -> Self {
        let capacity = cipher.segment_size() + TAG_LEN + 1;
        DecryptingReader {
            inner,
            cipher,
            next_index: 0,
            buf: vec![0u8; capacity],
            plain: 0..0,
            carry: None,
            done: false,
        }
    }

    /// Reads and authenticates the next segment; false once the final segment was consumed.
    fn next_segment(&mut self) -> Result<bool, FormatError> {
        if self.done {
            return Ok(false);
        }
        let full = self.cipher.segment_size() + TAG_LEN;
        let mut filled = 0;
        if let Some(byte) = self.carry.take() {
            self.buf[0] = byte;
            filled = 1;
        }
        filled += read_up_to(&mut self.inner, &mut self.buf[filled..=full])?;
        let last = filled <= full;
        let segment_len = if last {
            filled
        } else {
            self.carry = Some(self.buf[full]);
            full
        };
        if segment_len < TAG_LEN {
            return Err(if self.next_index == 0 && segment_len == 0 {
                FormatError::BadLength("the file has a header but no segments".into())
            } else {
                FormatError::BadLength(format!(
                    "segment {} is {segment_len} bytes, shorter than its tag",
                    self.next_index
                ))
            });
        }
        let plaintext_len = self
            .cipher
            .open(self.next_index, last, &mut self.buf[..segment_len])?
            .len();
        self.plain = 0..plaintext_len;
        self.next_index += 1;
        self.done = last;
        Ok(true)
    }

    /// Returns the inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let plain = self.fill_buf()?;
        let n = out.len().min(plain.len());
        out[..n].copy_from_slice(&plain[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The decrypted segment is the buffer: [`BufRead::fill_buf`] hands out plaintext without
/// another copy (what `ppml decrypt` writes from).
impl<R: Read> BufRead for DecryptingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.plain.is_empty() {
            if !self.next_segment().map_err(FormatError::into_io)? {
                return Ok(&[]);
            }
        }
        Ok(&self.buf[self.plain.clone()])
    }

    fn consume(&mut self, amount: usize) {
        self.plain.start = (self.plain.start + amount).min(self.plain.end);
    }
}
