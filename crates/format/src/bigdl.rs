//! Reading BigDL PPML's encrypted files, for migrating their datasets into ppml
//! (`docs/migrating-from-bigdl.md` §1). ppml never writes these files.
//!
//! A BigDL dataset is a directory of part files and a `.meta` file
//! `{"encryptedDataKey": "<wrapped data key>"}`. Every part is AES-CBC/PKCS#5 ciphertext of the
//! whole part behind a header; the header and the trailer depend on the [`Variant`]:
//!
//! | variant | header | trailer | keys from the data key *string* `s` |
//! |---|---|---|---|
//! | [`Variant::Common`] (2.3+) | 400 bytes: u32 BE `L`, u32 BE IV length (16), `L` bytes of wrapped data key, IV, `0x80` up to 400 | HMAC-SHA256 over the ciphertext | MAC key `s[0..16]`, AES-128 key `s[16..32]` |
//! | [`Variant::Legacy22`] (2.2) | 25 bytes: `0x80`, u64 BE seconds, IV | HMAC-SHA256 (see below) | MAC key `s[0..16]`, AES-128 key `s[16..32]` |
//! | [`Variant::Legacy21`] (2.1) | as 2.2 | as 2.2 | MAC key `s[0..16]`, AES-256 key `s[16..48]` |
//! | [`Variant::NativeAesCbc`] | 16 bytes: IV | none | AES key = base64-decoded `s` |
//!
//! Ranges of `s` (its UTF-8 bytes) are zero-padded when `s` is shorter, as Java's
//! `Arrays.copyOfRange` does. BigDL writes the HMAC trailer but never checks it (its check is
//! inverted); [`PartReader`] does: a part whose trailer does not verify fails with
//! [`FormatError::BigDlAuthentication`]. 2.1 and 2.2 wrote the MAC over the ciphertext without
//! its final padding bytes (the MAC'd length is the plaintext's); the reader accepts that form
//! for those variants only. A `nativeaescbc` part carries no MAC at all and cannot be verified.

use std::io::{self, Read};

use aws_lc_rs::cipher::{
    AES_128, AES_256, DecryptionContext, PaddedBlockDecryptingKey, StreamingDecryptingKey,
    UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;
use zeroize::Zeroizing;

use crate::FormatError;

/// Length of a [`Variant::Common`] part header.
pub const COMMON_HEADER_LEN: usize = 400;
/// Length of a 2.1 or 2.2 part header.
pub const LEGACY_HEADER_LEN: usize = 25;
/// Length of an AES-CBC initialization vector.
pub const IV_LEN: usize = 16;
/// Length of the HMAC-SHA256 trailer.
pub const MAC_LEN: usize = 32;
/// The first byte of a 2.1 or 2.2 header (its version).
pub const LEGACY_VERSION: u8 = 0x80;
/// Name of a BigDL dataset's key file.
pub const META_FILE: &str = ".meta";
/// The `aad` BigDL sends to eHSM with every data key it generates and unwraps.
pub const EHSM_AAD: &str = "test";

const BLOCK: usize = 16;

/// Which BigDL writer produced a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `spark.bigdl.encryter.type = common`, the default of BigDL 2.3 and later.
    Common,
    /// BigDL 2.2.
    Legacy22,
    /// BigDL 2.1.
    Legacy21,
    /// `spark.bigdl.encryter.type = nativeaescbc` (2.3 and later): no MAC.
    NativeAesCbc,
}

impl Variant {
    /// Every variant, in the order of [`Variant::name`]s in messages.
    pub const ALL: [Variant; 4] = [
        Variant::Common,
        Variant::Legacy22,
        Variant::Legacy21,
        Variant::NativeAesCbc,
    ];

    /// The variant's name on ppml's command line: `common`, `2.2`, `2.1`, `nativeaescbc`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Common => "common",
            Variant::Legacy22 => "2.2",
            Variant::Legacy21 => "2.1",
            Variant::NativeAesCbc => "nativeaescbc",
        }
    }

    /// The variant named `name` (see [`Variant::name`]; case-insensitive).
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(name))
    }

    /// Length of this variant's part header.
    pub fn header_len(self) -> usize {
        match self {
            Variant::Common => COMMON_HEADER_LEN,
            Variant::Legacy22 | Variant::Legacy21 => LEGACY_HEADER_LEN,
            Variant::NativeAesCbc => IV_LEN,
        }
    }

    /// Whether parts of this variant carry an HMAC trailer that a reader can verify.
    pub fn is_authenticated(self) -> bool {
        self != Variant::NativeAesCbc
    }

    /// The variant a part's first bytes show, when they show one: a common header starts
    /// with a small big-endian length (its first byte is 0), a 2.1/2.2 header with `0x80`.
    /// `nativeaescbc` parts start with a random IV and are never detected; neither is 2.1
    /// apart from 2.2 ([`Variant::Legacy22`] is returned for both).
    pub fn detect(first_bytes: &[u8]) -> Option<Variant> {
        match first_bytes.first()? {
            0 => Some(Variant::Common),
            &LEGACY_VERSION => Some(Variant::Legacy22),
            _ => None,
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A part's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartHeader {
    /// The wrapped data key the header carries ([`Variant::Common`] only).
    pub wrapped_data_key: Option<String>,
    /// When the part was written, in Unix seconds (2.1 and 2.2 only).
    pub written_at: Option<u64>,
    /// The CBC initialization vector.
    pub iv: [u8; IV_LEN],
}

fn malformed(reason: impl Into<String>) -> FormatError {
    FormatError::BigDlMalformed(reason.into())
}

/// Parses the header of a part of `variant` from its first [`Variant::header_len`] bytes.
pub fn parse_header(variant: Variant, header: &[u8]) -> Result<PartHeader, FormatError> {
    if header.len() < variant.header_len() {
        return Err(malformed(format!(
            "the file is shorter than a {variant} header ({} bytes)",
            variant.header_len()
        )));
    }
    let iv_at = |at: usize| -> [u8; IV_LEN] {
        header[at..at + IV_LEN]
            .try_into()
            .expect("length checked above")
    };
    match variant {
        Variant::Common => {
            let key_len = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
            let iv_len = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
            if iv_len != IV_LEN {
                return Err(malformed(format!(
                    "the header's IV length is {iv_len}, not {IV_LEN}"
                )));
            }
            if 8 + key_len + IV_LEN > COMMON_HEADER_LEN {
                return Err(malformed(format!(
                    "the header's wrapped data key length {key_len} does not fit its 400 bytes"
                )));
            }
            let wrapped = std::str::from_utf8(&header[8..8 + key_len])
                .map_err(|_| malformed("the header's wrapped data key is not UTF-8 text"))?;
            if header[8 + key_len + IV_LEN..COMMON_HEADER_LEN]
                .iter()
                .any(|&b| b != 0x80)
            {
                return Err(malformed("the header's padding is not 0x80 bytes"));
            }
            Ok(PartHeader {
                wrapped_data_key: Some(wrapped.to_string()),
                written_at: None,
                iv: iv_at(8 + key_len),
            })
        }
        Variant::Legacy22 | Variant::Legacy21 => {
            if header[0] != LEGACY_VERSION {
                return Err(malformed(format!(
                    "the header's version byte is {:#04x}, not 0x80",
                    header[0]
                )));
            }
            Ok(PartHeader {
                wrapped_data_key: None,
                written_at: Some(u64::from_be_bytes(
                    header[1..9].try_into().expect("8 bytes"),
                )),
                iv: iv_at(9),
            })
        }
        Variant::NativeAesCbc => Ok(PartHeader {
            wrapped_data_key: None,
            written_at: None,
            iv: iv_at(0),
        }),
    }
}

/// Parses a dataset's `.meta` file and returns its wrapped data key.
pub fn parse_meta(bytes: &[u8]) -> Result<String, FormatError> {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "encryptedDataKey")]
        encrypted_data_key: String,
    }
    let meta: Meta = serde_json::from_slice(bytes).map_err(|e| {
        malformed(format!(
            "{META_FILE} is not {{\"encryptedDataKey\": …}}: {e}"
        ))
    })?;
    if meta.encrypted_data_key.is_empty() {
        return Err(malformed(format!(
            "{META_FILE} has an empty encryptedDataKey"
        )));
    }
    Ok(meta.encrypted_data_key)
}

/// A plaintext BigDL data key, as BigDL holds it: a string (for eHSM, the base64 text that
/// `Decrypt` answers). Zeroed on drop.
pub struct DataKeyString(Zeroizing<String>);

impl std::fmt::Debug for DataKeyString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKeyString(<redacted>)")
    }
}

impl DataKeyString {
    /// Wraps a data key string.
    pub fn new(text: Zeroizing<String>) -> Self {
        DataKeyString(text)
    }

    /// The data key string eHSM's `Decrypt` answers for these plaintext bytes (their base64).
    pub fn from_ehsm_plaintext(plaintext: &[u8]) -> Self {
        DataKeyString(Zeroizing::new(BASE64.encode(plaintext)))
    }

    /// `s[from..to]` zero-padded, as Java's `Arrays.copyOfRange` gives it.
    fn range(&self, from: usize, to: usize) -> Zeroizing<Vec<u8>> {
        let bytes = self.0.as_bytes();
        let mut out = Zeroizing::new(vec![0u8; to - from]);
        for (i, slot) in out.iter_mut().enumerate() {
            if let Some(&b) = bytes.get(from + i) {
                *slot = b;
            }
        }
        out
    }

    fn cipher_key(&self, variant: Variant) -> Result<UnboundCipherKey, FormatError> {
        let bad_key = || malformed("the data key does not make an AES key");
        match variant {
            Variant::Common | Variant::Legacy22 => {
                UnboundCipherKey::new(&AES_128, &self.range(16, 32)).map_err(|_| bad_key())
            }
            Variant::Legacy21 => {
                UnboundCipherKey::new(&AES_256, &self.range(16, 48)).map_err(|_| bad_key())
            }
            Variant::NativeAesCbc => {
                let bytes = Zeroizing::new(BASE64.decode(self.0.trim()).map_err(|_| {
                    malformed("a nativeaescbc data key must be base64 of an AES key")
                })?);
                let algorithm = match bytes.len() {
                    16 => &AES_128,
                    32 => &AES_256,
                    n => {
                        return Err(malformed(format!(
                            "a nativeaescbc data key of {n} bytes is no AES-128 or AES-256 key"
                        )));
                    }
                };
                UnboundCipherKey::new(algorithm, &bytes).map_err(|_| bad_key())
            }
        }
    }

    fn mac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.range(0, 16))
    }
}

/// Unwraps a data key wrapped without a KMS (BigDL's `primaryKeyPlainText` mode): `wrapped` is
/// base64 of AES/ECB/PKCS#5 (Java's `Cipher.getInstance("AES")`) of the data key string under
/// the base64-decoded `primary_key`.
pub fn unwrap_with_plaintext_primary_key(
    primary_key: &str,
    wrapped: &str,
) -> Result<DataKeyString, FormatError> {
    let key = Zeroizing::new(
        BASE64
            .decode(primary_key.trim())
            .map_err(|_| malformed("the plaintext primary key is not base64"))?,
    );
    let algorithm = match key.len() {
        16 => &AES_128,
        32 => &AES_256,
        n => {
            return Err(malformed(format!(
                "a plaintext primary key of {n} bytes is no AES-128 or AES-256 key"
            )));
        }
    };
    let mut buffer = Zeroizing::new(
        BASE64
            .decode(wrapped.trim())
            .map_err(|_| malformed("the wrapped data key is not base64"))?,
    );
    let cipher_key = UnboundCipherKey::new(algorithm, &key)
        .and_then(PaddedBlockDecryptingKey::ecb_pkcs7)
        .map_err(|_| malformed("the plaintext primary key does not make an AES key"))?;
    let plaintext = cipher_key
        .decrypt(&mut buffer, DecryptionContext::None)
        .map_err(|_| FormatError::BigDlDecryption)?;
    let text = std::str::from_utf8(plaintext).map_err(|_| FormatError::BigDlDecryption)?;
    Ok(DataKeyString(Zeroizing::new(text.to_string())))
}

/// Decrypts one part's body (everything after its header) as it is read, and checks its HMAC
/// trailer at the end.
///
/// Plaintext is returned before the trailer is checked: a caller must discard everything it
/// read when a read fails (ppml's importer writes it only into a dataset it commits after the
/// last read). Every error is a [`FormatError`] inside an [`io::Error`]
/// ([`FormatError::from_io`]).
pub struct PartReader<R> {
    inner: R,
    variant: Variant,
    cipher: Option<StreamingDecryptingKey>,
    mac: Option<(hmac::Key, hmac::Context)>,
    /// Bytes read but not yet decrypted: the trailer and (for 2.1/2.2) the final block are
    /// held back until the end is known.
    pending: Vec<u8>,
    plaintext: Vec<u8>,
    plaintext_at: usize,
    read_buf: Vec<u8>,
    ciphertext_len: u64,
    done: bool,
}

impl<R: Read> PartReader<R> {
    /// A reader of the body that follows `header` in `inner`, under `key`.
    pub fn new(
        inner: R,
        variant: Variant,
        header: &PartHeader,
        key: &DataKeyString,
    ) -> Result<Self, FormatError> {
        let cipher = StreamingDecryptingKey::cbc_pkcs7(
            key.cipher_key(variant)?,
            DecryptionContext::Iv128(FixedLength::from(header.iv)),
        )
        .map_err(|_| malformed("the data key does not make an AES-CBC key"))?;
        let mac = variant.is_authenticated().then(|| {
            let mac_key = key.mac_key();
            let context = hmac::Context::with_key(&mac_key);
            (mac_key, context)
        });
        Ok(PartReader {
            inner,
            variant,
            cipher: Some(cipher),
            mac,
            pending: Vec::new(),
            plaintext: Vec::new(),
            plaintext_at: 0,
            read_buf: vec![0u8; 1 << 18],
            ciphertext_len: 0,
            done: false,
        })
    }

    /// How many bytes at the end of `pending` stay there until the end of the part.
    fn held_back(&self) -> usize {
        match self.variant {
            Variant::Common => MAC_LEN,
            Variant::Legacy22 | Variant::Legacy21 => MAC_LEN + BLOCK,
            Variant::NativeAesCbc => 0,
        }
    }

    fn decrypt(&mut self, ciphertext_end: usize) -> Result<(), FormatError> {
        let cipher = self.cipher.as_mut().expect("not finished");
        let input = &self.pending[..ciphertext_end];
        if let Some((_, context)) = &mut self.mac {
            context.update(input);
        }
        self.plaintext.clear();
        self.plaintext_at = 0;
        self.plaintext.resize(input.len() + BLOCK, 0);
        let written = cipher
            .update(input, &mut self.plaintext)
            .map_err(|_| FormatError::BigDlDecryption)?
            .written()
            .len();
        self.plaintext.truncate(written);
        self.ciphertext_len += ciphertext_end as u64;
        self.pending.drain(..ciphertext_end);
        Ok(())
    }

    /// Decrypts what is held back, checks the trailer and the padding.
    fn finish(&mut self) -> Result<(), FormatError> {
        let trailer_len = if self.variant.is_authenticated() {
            MAC_LEN
        } else {
            0
        };
        let ciphertext_len =
            (self.ciphertext_len + self.pending.len() as u64).saturating_sub(trailer_len as u64);
        if self.pending.len() < trailer_len
            || ciphertext_len == 0
            || !ciphertext_len.is_multiple_of(BLOCK as u64)
        {
            return Err(malformed(format!(
                "its ciphertext is {ciphertext_len} bytes, not a positive multiple of {BLOCK}: \
                 the part was cut or has trailing bytes"
            )));
        }
        let body_end = self.pending.len() - trailer_len;
        let (last_blocks, trailer) = self.pending.split_at(body_end);
        let mut plaintext = Zeroizing::new(vec![0u8; body_end + 2 * BLOCK]);
        let mut cipher = self.cipher.take().expect("not finished");
        let mut written = cipher
            .update(last_blocks, &mut plaintext)
            .map_err(|_| FormatError::BigDlDecryption)?
            .written()
            .len();
        let finished = cipher
            .finish(&mut plaintext[written..])
            .map(|update| update.written().len());
        // The trailer is checked before the padding, so that a damaged part is reported as
        // such rather than as a wrong key.
        if let Some((_, context)) = self.mac.take() {
            let mut full = context.clone();
            full.update(last_blocks);
            let full_ok = constant_time_eq(full.sign().as_ref(), trailer);
            let legacy_ok = match (self.variant, &finished) {
                (Variant::Legacy22 | Variant::Legacy21, Ok(last_len)) => {
                    // 2.1 and 2.2 MAC'd as many ciphertext bytes as there are plaintext bytes.
                    let pad = BLOCK - last_len;
                    let mut cut = context;
                    cut.update(&last_blocks[..last_blocks.len().saturating_sub(pad)]);
                    last_blocks.len() >= pad && constant_time_eq(cut.sign().as_ref(), trailer)
                }
                _ => false,
            };
            if !(full_ok || legacy_ok) {
                return Err(FormatError::BigDlAuthentication);
            }
        }
        written += finished.map_err(|_| FormatError::BigDlDecryption)?;
        self.plaintext.clear();
        self.plaintext.extend_from_slice(&plaintext[..written]);
        self.plaintext_at = 0;
        self.pending.clear();
        Ok(())
    }

    fn fill(&mut self) -> Result<(), FormatError> {
        loop {
            let n = loop {
                match self.inner.read(&mut self.read_buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(FormatError::Io(e)),
                }
            };
            if n == 0 {
                self.done = true;
                return self.finish();
            }
            self.pending.extend_from_slice(&self.read_buf[..n]);
            let held = self.held_back();
            if self.pending.len() > held + BLOCK {
                // Whole blocks only, so that the held-back bytes stay aligned to the end.
                let available = self.pending.len() - held;
                let ciphertext_end = available - available % BLOCK;
                if ciphertext_end > 0 {
                    self.decrypt(ciphertext_end)?;
                    if !self.plaintext.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

impl<R: Read> Read for PartReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.plaintext_at == self.plaintext.len() {
            if self.done {
                return Ok(0);
            }
            self.fill().map_err(FormatError::into_io)?;
        }
        let n = buf.len().min(self.plaintext.len() - self.plaintext_at);
        buf[..n].copy_from_slice(&self.plaintext[self.plaintext_at..self.plaintext_at + n]);
        self.plaintext_at += n;
        Ok(n)
    }
}

impl<R> Drop for PartReader<R> {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.plaintext.zeroize();
    }
}

#[cfg(test)]
mod tests;
