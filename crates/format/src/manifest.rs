//! The dataset manifest: an authenticated list of a dataset's part files.
//!
//! The manifest is JSON so that people and other tools can read it, but its MAC covers a
//! binary canonical encoding (see `docs/file-format.md`), so no JSON canonicalisation is needed
//! to verify it. It binds the dataset id, the media type, the key reference and, for every
//! part in order, its name, its sizes and the SHA-256 of its header (which holds the part's
//! unique salt): removing, adding, renaming or swapping a part between datasets is detected.

use std::collections::HashSet;

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::key::random_bytes;
use crate::segment::manifest_mac_key;
use crate::{DataKey, FormatError, KeyReference};

/// File name of the manifest inside a dataset directory.
pub const MANIFEST_FILE_NAME: &str = "_manifest.ppml.json";
/// The `format` value of manifests this crate writes and reads.
pub const MANIFEST_FORMAT: &str = "ppml-dataset/1";
const CANONICAL_PREFIX: &[u8] = b"ppml-dataset/1 manifest\0";
const MAX_PART_NAME_LEN: usize = 255;

/// One part file of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartEntry {
    /// File name inside the dataset directory.
    pub name: String,
    /// Size of the encrypted file.
    pub ciphertext_len: u64,
    /// Size of its plaintext.
    pub plaintext_len: u64,
    /// SHA-256 of the part's header.
    pub header_sha256: [u8; 32],
}

/// A key of its own for some columns of a Parquet dataset ([`crate::pme`]): a data key
/// wrapped under another primary key than the dataset's, so that a reader released only the
/// dataset's key reads every other column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnKey {
    /// The Parquet column paths (dot-separated) encrypted with this key.
    pub columns: Vec<String>,
    /// The wrapped data key (same KMS, `aad` bound to the dataset like the dataset's key).
    pub key: KeyReference,
}

/// A verified manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    dataset_id: [u8; 16],
    media_type: String,
    key: KeyReference,
    salt: [u8; 32],
    parts: Vec<PartEntry>,
    column_keys: Vec<ColumnKey>,
    receipt_sha256: Option<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestJson {
    format: String,
    dataset_id: String,
    media_type: String,
    kms: String,
    key_id: String,
    wrapped_key: String,
    salt: String,
    parts: Vec<PartJson>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    column_keys: Vec<ColumnKeyJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    receipt_sha256: Option<String>,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnKeyJson {
    columns: Vec<String>,
    kms: String,
    key_id: String,
    wrapped_key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartJson {
    name: String,
    ciphertext_len: u64,
    plaintext_len: u64,
    header_sha256: String,
}

/// File name of a dataset's job receipt (`docs/receipts.md`), beside the manifest.
pub const RECEIPT_FILE_NAME: &str = "_receipt.ppml.json";

fn sha256(bytes: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Rejects part names that could escape the dataset directory or collide with the manifest.
pub fn validate_part_name(name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PART_NAME_LEN
        && !name.starts_with(['.', '_'])
        && !name.contains(['/', '\\', '\0']);
    if ok {
        Ok(())
    } else {
        Err(FormatError::MalformedManifest(format!(
            "invalid part file name {name:?}"
        )))
    }
}

impl Manifest {
    /// A manifest for a new dataset; call [`Manifest::to_json`] to seal and serialize it.
    pub fn new(
        dataset_id: [u8; 16],
        media_type: impl Into<String>,
        key: KeyReference,
        parts: Vec<PartEntry>,
    ) -> Result<Self, FormatError> {
        let mut salt = [0u8; 32];
        random_bytes(&mut salt)?;
        let manifest = Manifest {
            dataset_id,
            media_type: media_type.into(),
            key,
            salt,
            parts,
            column_keys: Vec::new(),
            receipt_sha256: None,
        };
        manifest.check_parts()?;
        Ok(manifest)
    }

    /// This manifest binding the job receipt whose file has SHA-256 `receipt_sha256`
    /// ([`RECEIPT_FILE_NAME`], `docs/receipts.md`): the receipt is part of the dataset.
    pub fn with_receipt(mut self, receipt_sha256: [u8; 32]) -> Self {
        self.receipt_sha256 = Some(receipt_sha256);
        self
    }

    /// SHA-256 of the job receipt this dataset carries, if any.
    pub fn receipt_sha256(&self) -> Option<&[u8; 32]> {
        self.receipt_sha256.as_ref()
    }

    /// SHA-256 of everything the manifest binds but its receipt: what a job receipt names
    /// its output by, so that the receipt and the manifest can bind each other.
    pub fn content_sha256(&self) -> [u8; 32] {
        sha256(&self.canonical_content())
    }

    /// This manifest with `column_keys` (a Parquet dataset's keys for some of its columns).
    pub fn with_column_keys(mut self, column_keys: Vec<ColumnKey>) -> Result<Self, FormatError> {
        self.column_keys = column_keys;
        self.check_column_keys()?;
        Ok(self)
    }

    fn check_column_keys(&self) -> Result<(), FormatError> {
        let mut seen = HashSet::new();
        for key in &self.column_keys {
            if key.columns.is_empty() {
                return Err(FormatError::MalformedManifest(
                    "a column key names no column".into(),
                ));
            }
            for column in &key.columns {
                if column.is_empty() || !seen.insert(column.as_str()) {
                    return Err(FormatError::MalformedManifest(format!(
                        "column {column:?} is empty or has two keys"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The keys of columns encrypted under their own primary keys (Parquet datasets).
    pub fn column_keys(&self) -> &[ColumnKey] {
        &self.column_keys
    }

    fn check_parts(&self) -> Result<(), FormatError> {
        let mut seen = HashSet::new();
        for part in &self.parts {
            validate_part_name(&part.name)?;
            if !seen.insert(part.name.as_str()) {
                return Err(FormatError::MalformedManifest(format!(
                    "part {:?} is listed twice",
                    part.name
                )));
            }
        }
        Ok(())
    }

    /// The dataset id, also written in every part's header.
    pub fn dataset_id(&self) -> &[u8; 16] {
        &self.dataset_id
    }

    /// What the plaintext of the parts is, e.g. `text/csv; header=present`.
    pub fn media_type(&self) -> &str {
        &self.media_type
    }

    /// The key reference shared by the manifest and all parts.
    pub fn key(&self) -> &KeyReference {
        &self.key
    }

    /// The parts, in dataset order.
    pub fn parts(&self) -> &[PartEntry] {
        &self.parts
    }

    /// Total plaintext bytes of all parts.
    pub fn plaintext_len(&self) -> u64 {
        self.parts.iter().map(|p| p.plaintext_len).sum()
    }

    fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = self.canonical_content();
        // Manifests without a receipt encode exactly as before receipts existed.
        if let Some(receipt) = &self.receipt_sha256 {
            out.extend_from_slice(b"receipt\0");
            out.extend_from_slice(receipt);
        }
        out
    }

    /// The canonical encoding without the receipt extension.
    fn canonical_content(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.parts.len() * 64);
        out.extend_from_slice(CANONICAL_PREFIX);
        out.extend_from_slice(&self.dataset_id);
        for field in [
            self.media_type.as_bytes(),
            self.key.kms.as_bytes(),
            self.key.key_id.as_bytes(),
            &self.key.wrapped,
        ] {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&(self.parts.len() as u64).to_be_bytes());
        for part in &self.parts {
            out.extend_from_slice(&(part.name.len() as u32).to_be_bytes());
            out.extend_from_slice(part.name.as_bytes());
            out.extend_from_slice(&part.ciphertext_len.to_be_bytes());
            out.extend_from_slice(&part.plaintext_len.to_be_bytes());
            out.extend_from_slice(&part.header_sha256);
        }
        // Manifests without column keys encode exactly as before column keys existed.
        if !self.column_keys.is_empty() {
            out.extend_from_slice(b"column_keys\0");
            out.extend_from_slice(&(self.column_keys.len() as u64).to_be_bytes());
            for key in &self.column_keys {
                out.extend_from_slice(&(key.columns.len() as u32).to_be_bytes());
                let fields = key.columns.iter().map(|c| c.as_bytes()).chain([
                    key.key.kms.as_bytes(),
                    key.key.key_id.as_bytes(),
                    &key.key.wrapped[..],
                ]);
                for field in fields {
                    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
                    out.extend_from_slice(field);
                }
            }
        }
        out
    }

    /// Computes the MAC with `data_key` and serializes the manifest as pretty JSON.
    pub fn to_json(&self, data_key: &DataKey) -> Vec<u8> {
        let key = manifest_mac_key(data_key, &self.salt);
        let mac = hmac::sign(&key, &self.canonical_bytes());
        let json = ManifestJson {
            format: MANIFEST_FORMAT.to_string(),
            dataset_id: hex::encode(self.dataset_id),
            media_type: self.media_type.clone(),
            kms: self.key.kms.clone(),
            key_id: self.key.key_id.clone(),
            wrapped_key: BASE64.encode(&self.key.wrapped),
            salt: hex::encode(self.salt),
            parts: self
                .parts
                .iter()
                .map(|p| PartJson {
                    name: p.name.clone(),
                    ciphertext_len: p.ciphertext_len,
                    plaintext_len: p.plaintext_len,
                    header_sha256: hex::encode(p.header_sha256),
                })
                .collect(),
            column_keys: self
                .column_keys
                .iter()
                .map(|k| ColumnKeyJson {
                    columns: k.columns.clone(),
                    kms: k.key.kms.clone(),
                    key_id: k.key.key_id.clone(),
                    wrapped_key: BASE64.encode(&k.key.wrapped),
                })
                .collect(),
            receipt_sha256: self.receipt_sha256.map(hex::encode),
            mac: hex::encode(mac.as_ref()),
        };
        let mut out = serde_json::to_vec_pretty(&json).expect("manifest serializes");
        out.push(b'\n');
        out
    }
}

/// A manifest parsed from JSON whose MAC has not been checked. Only its key reference may be
/// used (to obtain the data key), and only to call [`UnverifiedManifest::verify`].
#[derive(Clone, Debug)]
pub struct UnverifiedManifest {
    manifest: Manifest,
    mac: Vec<u8>,
}

fn decode_hex<const N: usize>(field: &str, value: &str) -> Result<[u8; N], FormatError> {
    let bytes = hex::decode(value)
        .map_err(|_| FormatError::MalformedManifest(format!("{field} is not hex")))?;
    bytes
        .try_into()
        .map_err(|_| FormatError::MalformedManifest(format!("{field} must be {N} bytes")))
}

impl UnverifiedManifest {
    /// Parses a manifest file.
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let json: ManifestJson = serde_json::from_slice(bytes)
            .map_err(|e| FormatError::MalformedManifest(e.to_string()))?;
        if json.format != MANIFEST_FORMAT {
            return Err(FormatError::MalformedManifest(format!(
                "unsupported format {:?} (expected {MANIFEST_FORMAT:?})",
                json.format
            )));
        }
        let wrapped = BASE64
            .decode(&json.wrapped_key)
            .map_err(|_| FormatError::MalformedManifest("wrapped_key is not base64".into()))?;
        let parts = json
            .parts
            .iter()
            .map(|p| {
                Ok(PartEntry {
                    name: p.name.clone(),
                    ciphertext_len: p.ciphertext_len,
                    plaintext_len: p.plaintext_len,
                    header_sha256: decode_hex::<32>("header_sha256", &p.header_sha256)?,
                })
            })
            .collect::<Result<Vec<_>, FormatError>>()?;
        let manifest = Manifest {
            dataset_id: decode_hex::<16>("dataset_id", &json.dataset_id)?,
            media_type: json.media_type,
            key: KeyReference::new(json.kms, json.key_id, wrapped),
            salt: decode_hex::<32>("salt", &json.salt)?,
            parts,
            column_keys: json
                .column_keys
                .into_iter()
                .map(|k| {
                    let wrapped = BASE64.decode(&k.wrapped_key).map_err(|_| {
                        FormatError::MalformedManifest("a column key is not base64".into())
                    })?;
                    Ok(ColumnKey {
                        columns: k.columns,
                        key: KeyReference::new(k.kms, k.key_id, wrapped),
                    })
                })
                .collect::<Result<Vec<_>, FormatError>>()?,
            receipt_sha256: json
                .receipt_sha256
                .as_deref()
                .map(|h| decode_hex::<32>("receipt_sha256", h))
                .transpose()?,
        };
        manifest.check_parts()?;
        manifest.check_column_keys()?;
        let mac = decode_hex::<32>("mac", &json.mac)?.to_vec();
        Ok(UnverifiedManifest { manifest, mac })
    }

    /// The key reference to ask the KMS about. Not yet authenticated.
    pub fn key(&self) -> &KeyReference {
        &self.manifest.key
    }

    /// The column keys as written (Parquet datasets). Not yet authenticated: only to ask
    /// the KMS for them.
    pub fn column_keys(&self) -> &[ColumnKey] {
        &self.manifest.column_keys
    }

    /// The dataset id as written. Not yet authenticated.
    pub fn dataset_id(&self) -> &[u8; 16] {
        &self.manifest.dataset_id
    }

    /// The manifest as written, for reading without the data key (a receipt verifier, which
    /// compares it with what a signed receipt says). Not authenticated.
    pub fn unauthenticated(&self) -> &Manifest {
        &self.manifest
    }

    /// Checks the MAC (in constant time) and returns the manifest.
    pub fn verify(self, data_key: &DataKey) -> Result<Manifest, FormatError> {
        let key = manifest_mac_key(data_key, &self.manifest.salt);
        hmac::verify(&key, &self.manifest.canonical_bytes(), &self.mac)
            .map_err(|_| FormatError::ManifestAuthentication)?;
        Ok(self.manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(data_key: &DataKey) -> Vec<u8> {
        let parts = vec![
            PartEntry {
                name: "part-00000.csv.ppml".into(),
                ciphertext_len: 200,
                plaintext_len: 100,
                header_sha256: [1; 32],
            },
            PartEntry {
                name: "part-00001.csv.ppml".into(),
                ciphertext_len: 300,
                plaintext_len: 150,
                header_sha256: [2; 32],
            },
        ];
        let key = KeyReference::new("local:test", "pk", vec![9; 60]);
        Manifest::new([5; 16], "text/csv; header=present", key, parts)
            .unwrap()
            .to_json(data_key)
    }

    #[test]
    fn round_trip_verifies() {
        let dk = DataKey::generate().unwrap();
        let json = sample(&dk);
        let m = UnverifiedManifest::from_json(&json)
            .unwrap()
            .verify(&dk)
            .unwrap();
        assert_eq!(m.parts().len(), 2);
        assert_eq!(m.plaintext_len(), 250);
    }

    #[test]
    fn a_receipt_is_bound_by_the_mac_but_not_by_the_content_digest() {
        let dk = DataKey::generate().unwrap();
        let manifest = UnverifiedManifest::from_json(&sample(&dk))
            .unwrap()
            .verify(&dk)
            .unwrap();
        let content = manifest.content_sha256();
        let with_receipt = manifest.clone().with_receipt([3; 32]);
        assert_eq!(with_receipt.content_sha256(), content);
        let json = with_receipt.to_json(&dk);
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(&format!("\"receipt_sha256\": \"{}\"", hex::encode([3; 32]))));
        let read = UnverifiedManifest::from_json(&json).unwrap();
        assert_eq!(read.unauthenticated().content_sha256(), content);
        assert_eq!(read.verify(&dk).unwrap().receipt_sha256(), Some(&[3; 32]));
        // Another receipt named, or the receipt removed: the MAC fails.
        let swapped = text.replace(&hex::encode([3; 32]), &hex::encode([4; 32]));
        let removed = text.replace(
            &format!("  \"receipt_sha256\": \"{}\",\n", hex::encode([3; 32])),
            "",
        );
        assert_ne!(removed, text);
        for edited in [swapped, removed] {
            assert!(matches!(
                UnverifiedManifest::from_json(edited.as_bytes())
                    .unwrap()
                    .verify(&dk),
                Err(FormatError::ManifestAuthentication)
            ));
        }
        // Manifests without a receipt are unchanged.
        assert!(!String::from_utf8(sample(&dk)).unwrap().contains("receipt"));
    }

    #[test]
    fn wrong_key_fails() {
        let dk = DataKey::generate().unwrap();
        let other = DataKey::generate().unwrap();
        let json = sample(&dk);
        let err = UnverifiedManifest::from_json(&json)
            .unwrap()
            .verify(&other)
            .unwrap_err();
        assert!(matches!(err, FormatError::ManifestAuthentication));
    }

    /// Asserts that `json` edited by each replacement, and by `edit`, fails authentication.
    fn assert_edits_detected(
        json: &str,
        dk: &DataKey,
        replacements: &[(&str, &str)],
        edit: impl Fn(&mut serde_json::Value),
    ) {
        let mut edited: Vec<String> = replacements
            .iter()
            .map(|(from, to)| {
                let edited = json.replacen(from, to, 1);
                assert_ne!(edited, json, "{from} not found");
                edited
            })
            .collect();
        let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
        edit(&mut value);
        edited.push(value.to_string());
        for text in edited {
            let err = UnverifiedManifest::from_json(text.as_bytes())
                .unwrap()
                .verify(dk)
                .unwrap_err();
            assert!(matches!(err, FormatError::ManifestAuthentication), "{text}");
        }
    }

    #[test]
    fn every_edit_is_detected() {
        let dk = DataKey::generate().unwrap();
        let json = String::from_utf8(sample(&dk)).unwrap();
        let replacements = [
            ("part-00001", "part-00002"),
            ("\"plaintext_len\": 100", "\"plaintext_len\": 101"),
            ("header=present", "header=absent"),
            ("\"key_id\": \"pk\"", "\"key_id\": \"pq\""),
        ];
        // And removing a part.
        assert_edits_detected(&json, &dk, &replacements, |value| {
            value["parts"].as_array_mut().unwrap().pop();
        });
    }

    #[test]
    fn column_keys_are_authenticated_and_optional() {
        let dk = DataKey::generate().unwrap();
        let plain = sample(&dk);
        assert!(!String::from_utf8_lossy(&plain).contains("column_keys"));
        let parts = UnverifiedManifest::from_json(&plain)
            .unwrap()
            .verify(&dk)
            .unwrap();
        let keyed = parts
            .clone()
            .with_column_keys(vec![ColumnKey {
                columns: vec!["ssn".into(), "address.street".into()],
                key: KeyReference::new("local:test", "pk2", vec![7; 60]),
            }])
            .unwrap();
        let json = String::from_utf8(keyed.to_json(&dk)).unwrap();
        let read = UnverifiedManifest::from_json(json.as_bytes()).unwrap();
        assert_eq!(read.column_keys()[0].key.key_id, "pk2");
        assert_eq!(read.verify(&dk).unwrap(), keyed);
        // Dropping the column keys is an edit too.
        let replacements = [("\"ssn\"", "\"age\""), ("\"pk2\"", "\"pk3\"")];
        assert_edits_detected(&json, &dk, &replacements, |value| {
            value.as_object_mut().unwrap().remove("column_keys");
        });
        // A column under two keys is malformed.
        assert!(
            parts
                .with_column_keys(vec![
                    ColumnKey {
                        columns: vec!["ssn".into()],
                        key: KeyReference::new("local:test", "pk2", vec![7; 60]),
                    },
                    ColumnKey {
                        columns: vec!["ssn".into()],
                        key: KeyReference::new("local:test", "pk3", vec![7; 60]),
                    },
                ])
                .is_err()
        );
    }

    #[test]
    fn rejects_escaping_names() {
        for bad in ["../x", "_manifest.ppml.json", ".hidden", "", "a/b"] {
            assert!(validate_part_name(bad).is_err(), "{bad}");
        }
        assert!(validate_part_name("part-00000.csv.ppml").is_ok());
    }
}
