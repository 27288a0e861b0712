//! The ppml encrypted file and dataset format.
//!
//! A ppml file is a short authenticated header followed by AES-256-GCM segments of a fixed
//! plaintext size (see `docs/file-format.md`). The header names the KMS, the primary key and
//! the *wrapped* data key; a random per-file salt derives the file's own keys from the data key
//! with HKDF-SHA256, so one data key safely encrypts many files. Each segment's nonce carries
//! its index and a last-segment flag, so truncation, reordering and splicing are detected, and
//! any byte range can be decrypted by reading only the segments that cover it.
//!
//! A dataset is a directory of such part files plus an authenticated [`manifest`] listing every
//! part by name, size and header digest. A Parquet dataset's parts may instead be Parquet
//! files encrypted with Parquet Modular Encryption, bound to the dataset by [`pme`].
//!
//! This crate does no I/O beyond the [`std::io`] traits and knows nothing of any KMS or query
//! engine: it turns a [`DataKey`] and bytes into bytes.
//!
//! ```
//! use ppml_format::{DataKey, Header, KeyReference, EncryptingWriter, DecryptingReader};
//! use std::io::{Read, Write};
//!
//! let data_key = DataKey::generate().unwrap();
//! let key_ref = KeyReference::new("local:demo", "primary-1", vec![0xAA; 60]);
//! let header = Header::new(key_ref, [7; 16], 4096).unwrap();
//! let mut writer = EncryptingWriter::new(Vec::new(), &header, &data_key).unwrap();
//! writer.write_all(b"name,age,job\nabc,30,Developer\n").unwrap();
//! let (file, _plaintext_len) = writer.finish().unwrap();
//!
//! let mut input = &file[..];
//! let unverified = ppml_format::UnverifiedHeader::read_from(&mut input).unwrap();
//! let mut reader = DecryptingReader::new(input, unverified, &data_key).unwrap();
//! let mut plaintext = String::new();
//! reader.read_to_string(&mut plaintext).unwrap();
//! assert_eq!(plaintext, "name,age,job\nabc,30,Developer\n");
//! ```

pub mod bigdl;
mod error;
mod header;
mod key;
pub mod manifest;
pub mod pme;
mod random_access;
pub mod receipt;
mod segment;
mod stream;
#[cfg(test)]
mod vectors;

pub use error::FormatError;
pub use header::{Header, MAGIC, MAX_HEADER_LEN, UnverifiedHeader};
pub use key::{DATA_KEY_LEN, DataKey, KeyReference};
pub use random_access::RandomAccessReader;
pub use segment::{
    DEFAULT_SEGMENT_SIZE, FileCipher, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, SegmentLayout, TAG_LEN,
};
pub use stream::{DecryptingReader, EncryptingWriter, FinishedFile};

/// Result type of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
