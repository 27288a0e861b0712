use std::io;

/// Everything that can go wrong reading or writing the ppml format.
///
/// Variants that describe *bad input* (tampering, truncation, a foreign file) are kept apart
/// from I/O failures and from misuse of the API, so that callers can tell a user "this file is
/// damaged" rather than "something failed".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The bytes do not start with the ppml magic: this is not a ppml encrypted file.
    #[error("not a ppml encrypted file (bad magic bytes)")]
    NotPpml,
    /// A ppml file of a format version this implementation does not know.
    #[error("unsupported ppml format version {0} (this build reads version 1)")]
    UnsupportedVersion(u8),
    /// The header is shorter than its declared length or its fields do not parse.
    #[error("malformed header: {0}")]
    MalformedHeader(&'static str),
    /// The header's MAC did not verify: the header was modified or the data key is wrong.
    #[error("header authentication failed: the header was modified or the data key is wrong")]
    HeaderAuthentication,
    /// A segment did not decrypt: modified, reordered, spliced from another file, or wrong key.
    #[error("segment {segment} failed authentication: the file was modified, reordered or cut")]
    SegmentAuthentication {
        /// Zero-based index of the segment.
        segment: u64,
    },
    /// The file ends cleanly after a segment that is not marked final: segments were removed.
    #[error("file is truncated: it ends after segment {segment}, which is not the final segment")]
    Truncated {
        /// Zero-based index of the last segment present.
        segment: u64,
    },
    /// The ciphertext length cannot be that of any valid file (cut inside a segment or header).
    #[error("file is truncated or has trailing bytes: {0}")]
    BadLength(String),
    /// The manifest is not valid JSON or misses required fields.
    #[error("malformed manifest: {0}")]
    MalformedManifest(String),
    /// The manifest's MAC did not verify: it was edited, or belongs to another data key.
    #[error("manifest authentication failed: the manifest was modified or the data key is wrong")]
    ManifestAuthentication,
    /// The key metadata of a Parquet file is not key material ppml reads ([`crate::pme`]).
    #[error("malformed Parquet key material: {0}")]
    MalformedKeyMaterial(String),
    /// A BigDL PPML file ([`crate::bigdl`]) whose structure is wrong: header, length, `.meta`.
    #[error("malformed BigDL file: {0}")]
    BigDlMalformed(String),
    /// A BigDL part's HMAC trailer does not verify: the part was modified, cut or extended, or
    /// the data key is wrong.
    #[error(
        "BigDL file authentication failed: its HMAC trailer does not match (the file was \
         modified or cut, or the data key is wrong)"
    )]
    BigDlAuthentication,
    /// A BigDL ciphertext does not decrypt to validly padded plaintext: the data key is wrong
    /// or (for `nativeaescbc`, which has no MAC) the file was modified.
    #[error(
        "BigDL file does not decrypt (bad padding): the data key is wrong or the file was \
         modified"
    )]
    BigDlDecryption,
    /// The input carries no authentication at all (BigDL `nativeaescbc`), so tampering with it
    /// could not be detected; reading it needs the caller's explicit consent.
    #[error("{0}")]
    Unverifiable(String),
    /// A parameter given by the caller is out of range (a programming or configuration error).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// An I/O error of the underlying reader or writer.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FormatError {
    /// True when the error means the input is damaged, forged or not ours (as opposed to an
    /// I/O failure or a misuse of the API).
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            FormatError::Io(_) | FormatError::InvalidParameter(_) | FormatError::Random
        )
    }

    /// Converts this error into an [`io::Error`] for use in [`io::Read`] implementations,
    /// keeping it recoverable with [`FormatError::from_io`].
    pub fn into_io(self) -> io::Error {
        match self {
            FormatError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }

    /// Recovers a [`FormatError`] carried inside an [`io::Error`] by [`FormatError::into_io`].
    pub fn from_io(err: io::Error) -> FormatError {
        if err
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<FormatError>().is_some())
        {
            let inner = err.into_inner().expect("checked above");
            *inner.downcast::<FormatError>().expect("checked above")
        } else {
            FormatError::Io(err)
        }
    }
}
