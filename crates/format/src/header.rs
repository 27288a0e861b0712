//! The file header: magic, lengths, salt, dataset id, key reference, and its MAC.

use std::io::Read;

use aws_lc_rs::digest;

use crate::key::random_bytes;
use crate::segment::{FileCipher, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
use crate::{DataKey, FormatError, KeyReference};

/// The eight bytes every ppml encrypted file starts with; the last byte is the format version.
pub const MAGIC: [u8; 8] = *b"PPMLENC\x01";
/// Largest header a reader accepts.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

const SALT_LEN: usize = 32;
const DATASET_ID_LEN: usize = 16;
const HEADER_TAG_LEN: usize = 32;
const FIXED_LEN: usize = MAGIC.len() + 4 + 4 + SALT_LEN + DATASET_ID_LEN;
const MIN_HEADER_LEN: usize = FIXED_LEN + 3 * 2 + HEADER_TAG_LEN;
const MAX_NAME_LEN: usize = 1024;
const MAX_WRAPPED_LEN: usize = 8 * 1024;

/// The parameters of one file, as written. A fresh random salt is drawn for every file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    segment_size: u32,
    salt: [u8; SALT_LEN],
    dataset_id: [u8; DATASET_ID_LEN],
    key: KeyReference,
}

impl Header {
    /// A header for a new file of dataset `dataset_id`, with a fresh random salt.
    pub fn new(
        key: KeyReference,
        dataset_id: [u8; DATASET_ID_LEN],
        segment_size: u32,
    ) -> Result<Self, FormatError> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
            return Err(FormatError::InvalidParameter(format!(
                "segment size {segment_size} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}"
            )));
        }
        for (what, len, max) in [
            ("KMS id", key.kms.len(), MAX_NAME_LEN),
            ("key id", key.key_id.len(), MAX_NAME_LEN),
            ("wrapped key", key.wrapped.len(), MAX_WRAPPED_LEN),
        ] {
            if len == 0 || len > max {
                return Err(FormatError::InvalidParameter(format!(
                    "{what} must be 1..={max} bytes, got {len}"
                )));
            }
        }
        let mut salt = [0u8; SALT_LEN];
        random_bytes(&mut salt)?;
        Ok(Header {
            segment_size,
            salt,
            dataset_id,
            key,
        })
    }

    /// A header with a chosen salt, for deterministic test vectors only.
    #[cfg(test)]
    pub(crate) fn with_salt(mut self, salt: [u8; SALT_LEN]) -> Self {
        self.salt = salt;
        self
    }

    /// Plaintext bytes per non-final segment.
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    /// The dataset this file belongs to.
    pub fn dataset_id(&self) -> &[u8; DATASET_ID_LEN] {
        &self.dataset_id
    }

    /// Where the data key comes from.
    pub fn key(&self) -> &KeyReference {
        &self.key
    }

    pub(crate) fn cipher(&self, data_key: &DataKey) -> FileCipher {
        FileCipher::derive(data_key, &self.salt, self.segment_size)
    }

    /// Serializes the header and appends its MAC.
    pub(crate) fn encode(&self, cipher: &FileCipher) -> Vec<u8> {
        let len =
            MIN_HEADER_LEN + self.key.kms.len() + self.key.key_id.len() + self.key.wrapped.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&self.segment_size.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.dataset_id);
        for field in [
            self.key.kms.as_bytes(),
            self.key.key_id.as_bytes(),
            &self.key.wrapped,
        ] {
            out.extend_from_slice(&(field.len() as u16).to_be_bytes());
            out.extend_from_slice(field);
        }
        let tag = cipher.header_tag(&out);
        out.extend_from_slice(tag.as_ref());
        debug_assert_eq!(out.len(), len);
        out
    }
}

/// A header read from a file whose MAC has not been checked yet. Its key reference may be used
/// to ask a KMS for the data key; nothing else may be trusted until [`UnverifiedHeader::verify`].
#[derive(Clone, Debug)]
pub struct UnverifiedHeader {
    bytes: Vec<u8>,
    header: Header,
}

impl UnverifiedHeader {
    /// How many bytes the header occupies, read from the first 12 bytes of a file.
    pub fn declared_len(prefix: &[u8]) -> Result<usize, FormatError> {
        if prefix.len() < MAGIC.len() || prefix[..MAGIC.len() - 1] != MAGIC[..MAGIC.len() - 1] {
            return Err(FormatError::NotPpml);
        }
        if prefix[MAGIC.len() - 1] != MAGIC[MAGIC.len() - 1] {
            return Err(FormatError::UnsupportedVersion(prefix[MAGIC.len() - 1]));
        }
        let Some(len) = prefix.get(8..12) else {
            return Err(FormatError::MalformedHeader("file ends inside the header"));
        };
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        if !(MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&len) {
            return Err(FormatError::MalformedHeader("header length out of range"));
        }
        Ok(len)
    }

    /// Reads exactly one header from the start of `reader`.
    pub fn read_from<R: Read>(reader: &mut R) -> Result<Self, FormatError> {
        let mut prefix = [0u8; 12];
        let got = read_up_to(reader, &mut prefix)?;
        let len = Self::declared_len(&prefix[..got])?;
        let mut bytes = vec![0u8; len];
        bytes[..12].copy_from_slice(&prefix);
        let got = read_up_to(reader, &mut bytes[12..])?;
        if got != len - 12 {
            return Err(FormatError::MalformedHeader("file ends inside the header"));
        }
        Self::parse(&bytes)
    }

    /// Parses the header at the start of `file_prefix`, which must hold the whole header.
    pub fn parse(file_prefix: &[u8]) -> Result<Self, FormatError> {
        let len = Self::declared_len(file_prefix)?;
        let bytes = file_prefix
            .get(..len)
            .ok_or(FormatError::MalformedHeader("file ends inside the header"))?;
        let mut at = 12;
        let segment_size = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        at += 4;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
            return Err(FormatError::MalformedHeader("segment size out of range"));
        }
        let salt: [u8; SALT_LEN] = bytes[at..at + SALT_LEN].try_into().expect("salt");
        at += SALT_LEN;
        let dataset_id: [u8; DATASET_ID_LEN] =
            bytes[at..at + DATASET_ID_LEN].try_into().expect("id");
        at += DATASET_ID_LEN;
        let body_end = len - HEADER_TAG_LEN;
        let mut field = |max: usize| -> Result<Vec<u8>, FormatError> {
            let n = bytes
                .get(at..at + 2)
                .filter(|_| at + 2 <= body_end)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                .ok_or(FormatError::MalformedHeader(
                    "field length past the header end",
                ))?;
            if n == 0 || n > max || at + 2 + n > body_end {
                return Err(FormatError::MalformedHeader("field length out of range"));
            }
            let value = bytes[at + 2..at + 2 + n].to_vec();
            at += 2 + n;
            Ok(value)
        };
        let kms = String::from_utf8(field(MAX_NAME_LEN)?)
            .map_err(|_| FormatError::MalformedHeader("KMS id is not UTF-8"))?;
        let key_id = String::from_utf8(field(MAX_NAME_LEN)?)
            .map_err(|_| FormatError::MalformedHeader("key id is not UTF-8"))?;
        let wrapped = field(MAX_WRAPPED_LEN)?;
        if at != body_end {
            return Err(FormatError::MalformedHeader(
                "header length does not match its fields",
            ));
        }
        Ok(UnverifiedHeader {
            bytes: bytes.to_vec(),
            header: Header {
                segment_size,
                salt,
                dataset_id,
                key: KeyReference {
                    kms,
                    key_id,
                    wrapped,
                },
            },
        })
    }

    /// The key reference to hand to the KMS named in it. Not yet authenticated.
    pub fn key(&self) -> &KeyReference {
        &self.header.key
    }

    /// The dataset id as written. Not yet authenticated.
    pub fn dataset_id(&self) -> &[u8; DATASET_ID_LEN] {
        &self.header.dataset_id
    }

    /// Total header length in bytes; the first segment starts here.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a header has at least its fixed fields.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// SHA-256 of the header bytes, as recorded in a dataset manifest.
    pub fn sha256(&self) -> [u8; 32] {
        sha256(&self.bytes)
    }

    /// Checks the header MAC with `data_key` and returns the header with the file's keys.
    pub fn verify(self, data_key: &DataKey) -> Result<(Header, FileCipher), FormatError> {
        let cipher = self.header.cipher(data_key);
        let (body, tag) = self.bytes.split_at(self.bytes.len() - HEADER_TAG_LEN);
        if !cipher.verify_header_tag(body, tag) {
            return Err(FormatError::HeaderAuthentication);
        }
        Ok((self.header, cipher))
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
pub(crate) fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, FormatError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FormatError::Io(e)),
        }
    }
    Ok(got)
}
