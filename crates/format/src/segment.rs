//! Key derivation, segment nonces and the arithmetic of segment offsets.

use std::ops::Range;

use aws_lc_rs::{aead, hkdf, hmac};

use crate::{DataKey, FormatError};

/// Length of the AES-GCM tag that ends every segment.
pub const TAG_LEN: usize = 16;
/// Default plaintext bytes per segment (64 KiB).
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Smallest allowed segment size.
pub const MIN_SEGMENT_SIZE: u32 = 64;
/// Largest allowed segment size (16 MiB).
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;

const INFO_SEGMENT_KEY: &[u8] = b"ppml/v1 segment key";
const INFO_HEADER_MAC: &[u8] = b"ppml/v1 header mac";
const INFO_MANIFEST_MAC: &[u8] = b"ppml/v1 manifest mac";

/// The keys of one file, derived from the data key and the file's salt with HKDF-SHA256.
///
/// Holding a `FileCipher` for a file you are reading means its header was verified: the only
/// public way to get one for reading is [`crate::UnverifiedHeader::verify`].
pub struct FileCipher {
    segment_key: aead::LessSafeKey,
    header_mac: hmac::Key,
    segment_size: usize,
}

fn prk(data_key: &DataKey, salt: &[u8]) -> hkdf::Prk {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(data_key.expose_secret())
}

/// The key that authenticates a dataset manifest, derived from the data key and the manifest's
/// salt.
pub(crate) fn manifest_mac_key(data_key: &DataKey, salt: &[u8]) -> hmac::Key {
    let prk = prk(data_key, salt);
    let okm = prk
        .expand(&[INFO_MANIFEST_MAC], hmac::HMAC_SHA256)
        .expect("HMAC-SHA256 key length is valid for HKDF-SHA256");
    hmac::Key::from(okm)
}

impl FileCipher {
    pub(crate) fn derive(data_key: &DataKey, salt: &[u8], segment_size: u32) -> Self {
        let prk = prk(data_key, salt);
        let segment_key = aead::UnboundKey::from(
            prk.expand(&[INFO_SEGMENT_KEY], &aead::AES_256_GCM)
                .expect("AES-256 key length is valid for HKDF-SHA256"),
        );
        let header_mac = hmac::Key::from(
            prk.expand(&[INFO_HEADER_MAC], hmac::HMAC_SHA256)
                .expect("HMAC-SHA256 key length is valid for HKDF-SHA256"),
        );
        FileCipher {
            segment_key: aead::LessSafeKey::new(segment_key),
            header_mac,
            segment_size: segment_size as usize,
        }
    }

    pub(crate) fn header_tag(&self, header_body: &[u8]) -> hmac::Tag {
        hmac::sign(&self.header_mac, header_body)
    }

    pub(crate) fn verify_header_tag(&self, header_body: &[u8], tag: &[u8]) -> bool {
        // aws-lc-rs's verify compares in constant time.
        hmac::verify(&self.header_mac, header_body, tag).is_ok()
    }

    /// Plaintext bytes in every segment but the last.
    pub fn segment_size(&self) -> usize {
        self.segment_size
    }

    /// Encrypts `buf` in place as segment `index` and appends the tag.
    pub(crate) fn seal(&self, index: u64, last: bool, buf: &mut Vec<u8>) {
        let tag = self
            .segment_key
            .seal_in_place_separate_tag(segment_nonce(index, last), aead::Aad::empty(), buf)
            .expect("AES-GCM accepts segments of at most 16 MiB");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Encrypts `plaintext` as segment `index` into `out`: the ciphertext, then the tag, so
    /// `out` must be `TAG_LEN` bytes longer. Saves the copy into a buffer that
    /// [`FileCipher::seal`] needs when the plaintext is in someone else's buffer.
    pub(crate) fn seal_into(&self, index: u64, last: bool, plaintext: &[u8], out: &mut [u8]) {
        let (ciphertext, tag) = out.split_at_mut(plaintext.len());
        self.segment_key
            .seal_out_of_place_scatter(
                segment_nonce(index, last),
                aead::Aad::empty(),
                plaintext,
                ciphertext,
                &[],
                tag,
            )
            .expect("AES-GCM accepts segments of at most 16 MiB and the lengths match");
    }

    /// Decrypts one segment (ciphertext followed by its tag) in place and returns the
    /// plaintext, which is the first `buf.len() - TAG_LEN` bytes of `buf`.
    ///
    /// A final segment that fails to open as final but opens as non-final means the file was
    /// cut at a segment boundary; that is reported as [`FormatError::Truncated`].
    pub fn open<'b>(
        &self,
        index: u64,
        last: bool,
        buf: &'b mut [u8],
    ) -> Result<&'b mut [u8], FormatError> {
        let expected_max = self.segment_size + TAG_LEN;
        if buf.len() < TAG_LEN || buf.len() > expected_max || (!last && buf.len() != expected_max) {
            return Err(FormatError::SegmentAuthentication { segment: index });
        }
        // AWS-LC leaves the buffer unspecified on failure; keep a copy of a final segment so
        // that a failure can be told apart as truncation. Only one segment per file pays this.
        let backup = last.then(|| buf.to_vec());
        match self
            .segment_key
            .open_in_place(segment_nonce(index, last), aead::Aad::empty(), buf)
        {
            Ok(plaintext) => {
                if last && plaintext.is_empty() && index > 0 {
                    // Only an empty file may have an empty final segment.
                    return Err(FormatError::BadLength(
                        "empty final segment after a non-empty one".into(),
                    ));
                }
                Ok(plaintext)
            }
            Err(_) => {
                if let Some(mut copy) = backup
                    && copy.len() == expected_max
                    && self
                        .segment_key
                        .open_in_place(segment_nonce(index, false), aead::Aad::empty(), &mut copy)
                        .is_ok()
                {
                    return Err(FormatError::Truncated { segment: index });
                }
                Err(FormatError::SegmentAuthentication { segment: index })
            }
        }
    }
}

/// The 96-bit nonce of segment `index`: three zero bytes, the index as a big-endian u64, and a
/// last-segment flag byte (1 for the final segment, 0 otherwise). Keys are unique per file (the
/// salt), so a nonce only has to be unique within a file, which the index guarantees.
fn segment_nonce(index: u64, last: bool) -> aead::Nonce {
    let mut nonce = [0u8; aead::NONCE_LEN];
    nonce[3..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    aead::Nonce::assume_unique_for_key(nonce)
}

/// Where each segment of a file of known length lies, and how long its plaintext is.
///
/// Built from the ciphertext length alone; the length is only *trusted* once the final
/// segment, decrypted as final, has authenticated (readers in this crate do that first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLayout {
    header_len: u64,
    segment_size: u64,
    segment_count: u64,
    plaintext_len: u64,
}

impl SegmentLayout {
    /// Computes the layout of a file of `file_len` bytes whose header is `header_len` bytes.
    pub fn new(header_len: u64, segment_size: u32, file_len: u64) -> Result<Self, FormatError> {
        let segment_size = u64::from(segment_size);
        let tag = TAG_LEN as u64;
        let full = segment_size + tag;
        let body = file_len.checked_sub(header_len).ok_or_else(|| {
            FormatError::BadLength(format!(
                "{file_len} bytes is shorter than the {header_len}-byte header"
            ))
        })?;
        if body < tag {
            return Err(FormatError::BadLength(format!(
                "{body} bytes after the header, but the final segment alone needs {tag}"
            )));
        }
        let rem = body % full;
        let (segment_count, last_len) = if rem == 0 {
            (body / full, full)
        } else {
            (body / full + 1, rem)
        };
        if last_len < tag || (segment_count > 1 && last_len == tag) {
            return Err(FormatError::BadLength(format!(
                "final segment of {last_len} bytes: the file was cut inside a segment"
            )));
        }
        Ok(SegmentLayout {
            header_len,
            segment_size,
            segment_count,
            plaintext_len: body - segment_count * tag,
        })
    }

    /// Number of segments (at least one).
    pub fn segment_count(&self) -> u64 {
        self.segment_count
    }

    /// Total plaintext length of the file.
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Length of the header, which the first segment follows.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Plaintext bytes per non-final segment.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// True for the final segment.
    pub fn is_last(&self, index: u64) -> bool {
        index + 1 == self.segment_count
    }

    /// Byte range of segment `index` (ciphertext and tag) within the file.
    pub fn ciphertext_range(&self, index: u64) -> Range<u64> {
        let full = self.segment_size + TAG_LEN as u64;
        let start = self.header_len + index * full;
        let len = if self.is_last(index) {
            self.plaintext_len - index * self.segment_size + TAG_LEN as u64
        } else {
            full
        };
        start..start + len
    }

    /// Byte range of the file holding segments `segments` (a range of indices).
    pub fn ciphertext_range_of(&self, segments: Range<u64>) -> Range<u64> {
        if segments.is_empty() {
            let at = self
                .ciphertext_range(segments.start.min(self.segment_count - 1))
                .start;
            return at..at;
        }
        self.ciphertext_range(segments.start).start..self.ciphertext_range(segments.end - 1).end
    }

    /// Plaintext offset at which segment `index` starts.
    pub fn plaintext_offset(&self, index: u64) -> u64 {
        index * self.segment_size
    }

    /// Indices of the segments that hold the plaintext bytes `range` (clamped to the file).
    pub fn segments_covering(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.plaintext_len);
        if range.start >= end {
            let at = (range.start / self.segment_size).min(self.segment_count);
            return at..at;
        }
        (range.start / self.segment_size)..end.div_ceil(self.segment_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_empty_file_is_one_empty_segment() {
        let l = SegmentLayout::new(100, 64, 116).unwrap();
        assert_eq!(l.segment_count(), 1);
        assert_eq!(l.plaintext_len(), 0);
        assert_eq!(l.ciphertext_range(0), 100..116);
    }

    #[test]
    fn layout_of_exact_multiple_has_full_final_segment() {
        let l = SegmentLayout::new(10, 64, 10 + 2 * 80).unwrap();
        assert_eq!(l.segment_count(), 2);
        assert_eq!(l.plaintext_len(), 128);
        assert_eq!(l.ciphertext_range(1), 90..170);
        assert_eq!(l.segments_covering(0..128), 0..2);
        assert_eq!(l.segments_covering(64..65), 1..2);
        assert_eq!(l.segments_covering(63..64), 0..1);
    }

    #[test]
    fn layout_rejects_cut_inside_tag_or_empty_trailing_segment() {
        assert!(matches!(
            SegmentLayout::new(10, 64, 10 + 80 + 15),
            Err(FormatError::BadLength(_))
        ));
        assert!(matches!(
            SegmentLayout::new(10, 64, 10 + 80 + 16),
            Err(FormatError::BadLength(_))
        ));
        assert!(matches!(
            SegmentLayout::new(10, 64, 9),
            Err(FormatError::BadLength(_))
        ));
    }

    #[test]
    fn nonce_binds_index_and_last_flag() {
        let a = segment_nonce(1, false);
        let b = segment_nonce(1, true);
        let c = segment_nonce(2, false);
        assert_ne!(a.as_ref(), b.as_ref());
        assert_ne!(a.as_ref(), c.as_ref());
        assert_eq!(&a.as_ref()[3..11], &1u64.to_be_bytes());
    }
}
