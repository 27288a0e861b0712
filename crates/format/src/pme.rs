//! The pieces of a ppml Parquet dataset that are not Parquet: ppml writes its Parquet parts
//! with Parquet Modular Encryption (PME, `AES_GCM_V1`) through arrow-rs, and binds them to
//! the dataset with the values defined here (`docs/file-format.md` §12).
//!
//! - [`aad_prefix`]: every part's PME AAD prefix names the dataset and the part, so a part
//!   moved to another name or dataset fails authentication in its first module.
//! - [`KeyMaterial`]: the key metadata stored in the file for the footer and each column, in
//!   the Parquet key-management-tools format (`PKMT1`, internal storage, single wrapping)
//!   that pyarrow, Arrow C++ and parquet-mr read, with a [`WrappedKey`] as the wrapped DEK.
//! - [`footer_digest`]: the manifest's digest of a part, over the part's footer.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::{FormatError, KeyReference};

/// The media type of a dataset whose parts are PME-encrypted Parquet files.
pub const PME_MEDIA_TYPE: &str = "application/vnd.apache.parquet; encryption=pme";
/// The file extension of PME parts (they are Parquet files, not ppml files).
pub const PME_PART_EXTENSION: &str = "parquet";
const AAD_PREFIX_LABEL: &[u8] = b"ppml-pme/1\0";
const KEY_MATERIAL_TYPE: &str = "PKMT1";
const WRAPPED_KEY_VERSION: u8 = 1;
/// The longest footer a reader accepts (FileMetaData and, in encrypted-footer files,
/// FileCryptoMetaData).
pub const MAX_FOOTER_LEN: u64 = 64 << 20;

/// The PME AAD prefix of part `part_name` of dataset `dataset_id`:
/// `"ppml-pme/1\0" || dataset_id || part_name`.
pub fn aad_prefix(dataset_id: &[u8; 16], part_name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_PREFIX_LABEL.len() + 16 + part_name.len());
    out.extend_from_slice(AAD_PREFIX_LABEL);
    out.extend_from_slice(dataset_id);
    out.extend_from_slice(part_name.as_bytes());
    out
}

/// A KMS-wrapped key together with the `aad` it is bound to, as one opaque string: the
/// `wrappedDEK` of [`KeyMaterial`]. A client of the KMS (ppml, or a pyarrow `KmsClient`)
/// unwraps it with `Decrypt {keyid: masterKeyID, ciphertext: wrapped, aad}`.
///
/// Encoding: base64 of `0x01 || u16-BE len(aad) || aad || wrapped`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// The `aad` the key was wrapped with (ppml: `ppml-dataset:<hex dataset id>`).
    pub aad: Vec<u8>,
    /// The KMS's wrapped key, as in [`KeyReference::wrapped`].
    pub wrapped: Vec<u8>,
}

impl WrappedKey {
    /// The string form.
    pub fn encode(&self) -> Result<String, FormatError> {
        let aad_len = u16::try_from(self.aad.len())
            .map_err(|_| FormatError::InvalidParameter("aad longer than 65535 bytes".into()))?;
        let mut bytes = Vec::with_capacity(3 + self.aad.len() + self.wrapped.len());
        bytes.push(WRAPPED_KEY_VERSION);
        bytes.extend_from_slice(&aad_len.to_be_bytes());
        bytes.extend_from_slice(&self.aad);
        bytes.extend_from_slice(&self.wrapped);
        Ok(BASE64.encode(bytes))
    }

    /// Parses the string form.
    pub fn decode(text: &str) -> Result<Self, FormatError> {
        let bad = |why: &str| FormatError::MalformedKeyMaterial(format!("wrappedDEK {why}"));
        let bytes = BASE64.decode(text).map_err(|_| bad("is not base64"))?;
        let (&version, rest) = bytes.split_first().ok_or_else(|| bad("is empty"))?;
        if version != WRAPPED_KEY_VERSION {
            return Err(bad("is not a ppml wrapped key (version 1)"));
        }
        if rest.len() < 2 {
            return Err(bad("is truncated"));
        }
        let aad_len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let rest = &rest[2..];
        if rest.len() <= aad_len {
            return Err(bad("is truncated"));
        }
        Ok(WrappedKey {
            aad: rest[..aad_len].to_vec(),
            wrapped: rest[aad_len..].to_vec(),
        })
    }
}

/// Key material of one PME key, as stored in a Parquet file's key metadata (`PKMT1`, internal
/// storage, single wrapping). Footer key material also names the KMS instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMaterial {
    /// The footer key's material (else a column key's).
    pub is_footer_key: bool,
    /// The KMS id ([`KeyReference::kms`]); footer key only.
    pub kms_instance_id: String,
    /// The KMS URL as the writer knew it (`DEFAULT`: the reader's own); footer key only.
    pub kms_instance_url: String,
    /// The primary key id.
    pub master_key_id: String,
    /// The wrapped data key.
    pub wrapped_dek: WrappedKey,
}

/// Field names and order as the Parquet key tools write them (Arrow C++ `KeyMaterial`).
#[derive(Serialize, Deserialize)]
struct KeyMaterialJson {
    #[serde(rename = "keyMaterialType")]
    key_material_type: String,
    #[serde(rename = "internalStorage")]
    internal_storage: bool,
    #[serde(rename = "isFooterKey")]
    is_footer_key: bool,
    #[serde(
        rename = "kmsInstanceID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    kms_instance_id: Option<String>,
    #[serde(
        rename = "kmsInstanceURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    kms_instance_url: Option<String>,
    #[serde(rename = "masterKeyID")]
    master_key_id: String,
    #[serde(rename = "wrappedDEK")]
    wrapped_dek: String,
    #[serde(rename = "doubleWrapping")]
    double_wrapping: bool,
}

impl KeyMaterial {
    /// The material of `key`, a data key wrapped with `aad`.
    pub fn new(is_footer_key: bool, key: &KeyReference, aad: &[u8]) -> Self {
        KeyMaterial {
            is_footer_key,
            kms_instance_id: key.kms.clone(),
            kms_instance_url: "DEFAULT".into(),
            master_key_id: key.key_id.clone(),
            wrapped_dek: WrappedKey {
                aad: aad.to_vec(),
                wrapped: key.wrapped.clone(),
            },
        }
    }

    /// The key metadata bytes written into the file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let json = KeyMaterialJson {
            key_material_type: KEY_MATERIAL_TYPE.into(),
            internal_storage: true,
            is_footer_key: self.is_footer_key,
            kms_instance_id: self.is_footer_key.then(|| self.kms_instance_id.clone()),
            kms_instance_url: self.is_footer_key.then(|| self.kms_instance_url.clone()),
            master_key_id: self.master_key_id.clone(),
            wrapped_dek: self.wrapped_dek.encode()?,
            double_wrapping: false,
        };
        Ok(serde_json::to_vec(&json).expect("key material serializes"))
    }

    /// Parses key metadata read from a file. Only internally stored, single-wrapped `PKMT1`
    /// material is accepted.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let bad = |why: String| FormatError::MalformedKeyMaterial(why);
        let json: KeyMaterialJson =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not PKMT1 JSON: {e}")))?;
        if json.key_material_type != KEY_MATERIAL_TYPE {
            return Err(bad(format!(
                "key material type {:?} (expected {KEY_MATERIAL_TYPE})",
                json.key_material_type
            )));
        }
        if !json.internal_storage {
            return Err(bad("key material stored outside the file".into()));
        }
        if json.double_wrapping {
            return Err(bad(
                "double-wrapped keys (write with double_wrapping=False)".into(),
            ));
        }
        // The KMS instance belongs to footer key material only (as `to_bytes` writes it).
        let footer_only = |field: Option<String>| match json.is_footer_key {
            true => field.unwrap_or_default(),
            false => String::new(),
        };
        Ok(KeyMaterial {
            is_footer_key: json.is_footer_key,
            kms_instance_id: footer_only(json.kms_instance_id),
            kms_instance_url: footer_only(json.kms_instance_url),
            master_key_id: json.master_key_id,
            wrapped_dek: WrappedKey::decode(&json.wrapped_dek)?,
        })
    }

    /// The key reference to ask the KMS about, and the `aad` to ask with.
    pub fn key_reference(&self, kms: &str) -> (KeyReference, &[u8]) {
        (
            KeyReference::new(kms, &self.master_key_id, self.wrapped_dek.wrapped.clone()),
            &self.wrapped_dek.aad,
        )
    }
}

/// The length of the footer region of a Parquet file whose last 8 bytes are `last8`: the
/// footer (plus its 4-byte length and 4-byte magic), so that the file's last
/// `footer_region_len` bytes are what [`footer_digest`] covers.
pub fn footer_region_len(last8: &[u8], file_len: u64) -> Result<u64, FormatError> {
    let bad = |why: &str| FormatError::BadLength(format!("not a Parquet file: {why}"));
    let last8: &[u8; 8] = last8.try_into().map_err(|_| bad("shorter than 8 bytes"))?;
    if &last8[4..] != b"PARE" && &last8[4..] != b"PAR1" {
        return Err(bad("no Parquet magic at the end"));
    }
    let footer_len = u32::from_le_bytes(last8[..4].try_into().expect("4 bytes")) as u64;
    if footer_len > MAX_FOOTER_LEN {
        return Err(bad("the footer is longer than 64 MiB"));
    }
    let region = footer_len + 8;
    if region + 4 > file_len {
        return Err(bad("the footer is longer than the file"));
    }
    Ok(region)
}

/// SHA-256 of a Parquet file's footer region (its last [`footer_region_len`] bytes): the
/// `header_sha256` of a PME part in the manifest. `tail` is any suffix of the file holding
/// the whole region.
pub fn footer_digest(tail: &[u8], file_len: u64) -> Result<[u8; 32], FormatError> {
    if tail.len() < 8 {
        return Err(FormatError::BadLength(
            "not a Parquet file: shorter than 8 bytes".into(),
        ));
    }
    let region = footer_region_len(&tail[tail.len() - 8..], file_len)? as usize;
    if region > tail.len() {
        return Err(FormatError::BadLength(
            "the footer region was not read whole".into(),
        ));
    }
    Ok(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &tail[tail.len() - region..])
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_round_trips_in_the_key_tools_layout() {
        let key = KeyReference::new("ppml-kms:00ff", "0b0c-key", b"AQAAAAA...".to_vec());
        let footer = KeyMaterial::new(true, &key, b"ppml-dataset:0011");
        let bytes = footer.to_bytes().unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        // The field order pyarrow and parquet-mr write (a reader must not depend on it).
        let order: Vec<usize> = [
            "keyMaterialType",
            "internalStorage",
            "isFooterKey",
            "kmsInstanceID",
            "kmsInstanceURL",
            "masterKeyID",
            "wrappedDEK",
            "doubleWrapping",
        ]
        .iter()
        .map(|f| {
            text.find(&format!("\"{f}\""))
                .unwrap_or_else(|| panic!("{f}"))
        })
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert_eq!(KeyMaterial::parse(&bytes).unwrap(), footer);

        let column = KeyMaterial::new(false, &key, b"x");
        let text = String::from_utf8(column.to_bytes().unwrap()).unwrap();
        assert!(!text.contains("kmsInstanceID"), "{text}");
        let parsed = KeyMaterial::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.key_reference("ppml-kms:00ff").0, key);
        assert_eq!(parsed.key_reference("ppml-kms:00ff").1, b"x");
    }

    #[test]
    fn foreign_key_material_is_refused_clearly() {
        for (material, why) in [
            (
                r#"{"keyMaterialType":"PKMT2","internalStorage":true,"isFooterKey":true,"masterKeyID":"k","wrappedDEK":"AQ==","doubleWrapping":false}"#,
                "PKMT2",
            ),
            (
                r#"{"keyMaterialType":"PKMT1","internalStorage":false,"isFooterKey":true,"masterKeyID":"k","wrappedDEK":"AQ==","doubleWrapping":false}"#,
                "outside",
            ),
            (
                r#"{"keyMaterialType":"PKMT1","internalStorage":true,"isFooterKey":true,"masterKeyID":"k","wrappedDEK":"AQ==","doubleWrapping":true,"keyEncryptionKeyID":"a","wrappedKEK":"b"}"#,
                "double",
            ),
            (
                r#"{"keyMaterialType":"PKMT1","internalStorage":true,"isFooterKey":true,"masterKeyID":"k","wrappedDEK":"AgAA","doubleWrapping":false}"#,
                "version 1",
            ),
            ("kf", "JSON"),
        ] {
            let err = KeyMaterial::parse(material.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn wrapped_keys_carry_their_aad() {
        let wrapped = WrappedKey {
            aad: b"ppml-dataset:ab".to_vec(),
            wrapped: vec![1, 2, 3],
        };
        let text = wrapped.encode().unwrap();
        assert_eq!(WrappedKey::decode(&text).unwrap(), wrapped);
        assert!(WrappedKey::decode(&BASE64.encode([1u8, 0, 5, b'a'])).is_err());
    }

    #[test]
    fn the_footer_digest_covers_the_footer_region() {
        let mut file = b"PAR1".to_vec();
        file.extend_from_slice(&[0xAB; 100]);
        let footer = [0xCD; 20];
        file.extend_from_slice(&footer);
        file.extend_from_slice(&20u32.to_le_bytes());
        file.extend_from_slice(b"PAR1");
        let len = file.len() as u64;
        let digest = footer_digest(&file, len).unwrap();
        assert_eq!(
            digest,
            footer_digest(&file[file.len() - 28..], len).unwrap()
        );
        assert!(footer_digest(&file[file.len() - 27..], len).is_err());
        let mut flipped = file.clone();
        flipped[110] ^= 1; // in the footer
        assert_ne!(footer_digest(&flipped, len).unwrap(), digest);
        let mut body = file.clone();
        body[10] ^= 1; // before it
        assert_eq!(footer_digest(&body, len).unwrap(), digest);
        assert!(footer_region_len(b"\x10\0\0\0XXXX", 1000).is_err());
        assert!(footer_region_len(b"\xff\xff\0\0PAR1", 1000).is_err());
    }

    #[test]
    fn aad_prefixes_differ_by_dataset_and_part() {
        let a = aad_prefix(&[1; 16], "part-00000.parquet");
        assert_ne!(a, aad_prefix(&[2; 16], "part-00000.parquet"));
        assert_ne!(a, aad_prefix(&[1; 16], "part-00001.parquet"));
        assert!(a.starts_with(b"ppml-pme/1\0"));
    }
}
