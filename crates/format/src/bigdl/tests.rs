//! Test vectors in `testdata/bigdl/`, written by `compat/bigdl_writer.py` (an independent
//! writer made from BigDL's layout), and the damage every authenticated variant must detect.

use super::*;

const PEOPLE: &[u8] = include_bytes!("../../testdata/bigdl/people.csv");
const KEYS: &str = include_str!("../../testdata/bigdl/keys.json");

fn vector(variant: Variant) -> &'static [u8] {
    match variant {
        Variant::Common => include_bytes!("../../testdata/bigdl/part-common.csv.cbc"),
        Variant::Legacy22 => include_bytes!("../../testdata/bigdl/part-2.2.csv.cbc"),
        Variant::Legacy21 => include_bytes!("../../testdata/bigdl/part-2.1.csv.cbc"),
        Variant::NativeAesCbc => include_bytes!("../../testdata/bigdl/part-nativeaescbc.csv.cbc"),
    }
}

fn key_field(name: &str) -> String {
    let keys: serde_json::Value = serde_json::from_str(KEYS).unwrap();
    keys[name].as_str().unwrap().to_string()
}

fn data_key() -> DataKeyString {
    DataKeyString::new(Zeroizing::new(key_field("data_key")))
}

/// Reads `file` as `variant` through a reader that hands out `step` bytes at a time.
fn decrypt(
    variant: Variant,
    file: &[u8],
    key: &DataKeyString,
    step: usize,
) -> Result<Vec<u8>, FormatError> {
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let header = parse_header(variant, file)?;
    let body = &file[variant.header_len()..];
    let mut reader = PartReader::new(Trickle(body, step), variant, &header, key)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(FormatError::from_io)?;
    Ok(out)
}

#[test]
fn every_variant_decrypts_to_the_written_rows() {
    for variant in Variant::ALL {
        for step in [1, 7, 16, 1 << 20] {
            let rows = decrypt(variant, vector(variant), &data_key(), step)
                .unwrap_or_else(|e| panic!("{variant}, {step}-byte reads: {e}"));
            assert_eq!(rows, PEOPLE, "{variant}");
        }
    }
}

#[test]
fn headers_parse_and_show_their_variant() {
    let common = parse_header(Variant::Common, vector(Variant::Common)).unwrap();
    assert_eq!(
        common.wrapped_data_key.as_deref(),
        Some(key_field("wrapped").as_str())
    );
    assert_eq!(
        common.iv,
        *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"
    );
    let legacy = parse_header(Variant::Legacy22, vector(Variant::Legacy22)).unwrap();
    assert!(legacy.written_at.unwrap() > 1_600_000_000);
    assert_eq!(
        Variant::detect(vector(Variant::Common)),
        Some(Variant::Common)
    );
    assert_eq!(
        Variant::detect(vector(Variant::Legacy21)),
        Some(Variant::Legacy22)
    );
    assert_eq!(Variant::detect(&[0x17]), None);
    assert_eq!(
        Variant::from_name("NativeAESCBC"),
        Some(Variant::NativeAesCbc)
    );

    let mut bad = vector(Variant::Common).to_vec();
    bad[399] = 0;
    assert!(matches!(
        parse_header(Variant::Common, &bad),
        Err(FormatError::BigDlMalformed(_))
    ));
    bad[0..4].copy_from_slice(&1000u32.to_be_bytes());
    assert!(matches!(
        parse_header(Variant::Common, &bad),
        Err(FormatError::BigDlMalformed(_))
    ));
    assert!(matches!(
        parse_header(Variant::Legacy22, &[0x80; 10]),
        Err(FormatError::BigDlMalformed(_))
    ));
}

#[test]
fn a_flipped_byte_anywhere_after_the_header_is_refused() {
    for variant in [Variant::Common, Variant::Legacy22, Variant::Legacy21] {
        let file = vector(variant);
        for at in variant.header_len()..file.len() {
            let mut damaged = file.to_vec();
            damaged[at] ^= 0x01;
            match decrypt(variant, &damaged, &data_key(), 1 << 20) {
                Err(FormatError::BigDlAuthentication) => {}
                other => panic!("{variant}: byte {at} flipped gave {other:?}"),
            }
        }
    }
}

#[test]
fn a_cut_or_extended_part_is_refused() {
    for variant in [Variant::Common, Variant::Legacy22, Variant::Legacy21] {
        let file = vector(variant);
        for len in variant.header_len()..file.len() {
            let result = decrypt(variant, &file[..len], &data_key(), 1 << 20);
            assert!(
                matches!(
                    result,
                    Err(FormatError::BigDlAuthentication | FormatError::BigDlMalformed(_))
                ),
                "{variant} cut to {len}: {result:?}"
            );
        }
        let mut longer = file.to_vec();
        longer.extend_from_slice(&[0u8; 16]);
        assert!(
            decrypt(variant, &longer, &data_key(), 1 << 20).is_err(),
            "{variant}"
        );
    }
}

#[test]
fn a_wrong_key_or_variant_is_refused() {
    let wrong = DataKeyString::new(Zeroizing::new(
        "Q2x0n4HkR8Jc1pWm3ZsT7vYbA5eF9gLhKjNoPqRsTuU=".into(),
    ));
    for variant in Variant::ALL {
        let result = decrypt(variant, vector(variant), &wrong, 1 << 20);
        assert!(
            result.as_deref().ok() != Some(PEOPLE),
            "{variant}: {result:?}"
        );
    }
    // 2.1 and 2.2 share a header and a MAC key: the AES key tells them apart.
    assert!(
        decrypt(
            Variant::Legacy22,
            vector(Variant::Legacy21),
            &data_key(),
            64
        )
        .is_err()
    );
    assert!(
        decrypt(
            Variant::Legacy21,
            vector(Variant::Legacy22),
            &data_key(),
            64
        )
        .is_err()
    );
}

#[test]
fn no_kms_wrapped_keys_unwrap_with_the_plaintext_primary_key() {
    let key = unwrap_with_plaintext_primary_key(
        &key_field("primary_key_plaintext"),
        &key_field("wrapped"),
    )
    .unwrap();
    assert_eq!(*key.0, key_field("data_key"));
    let other_primary = BASE64.encode([9u8; 16]);
    assert!(unwrap_with_plaintext_primary_key(&other_primary, &key_field("wrapped")).is_err());
    assert!(unwrap_with_plaintext_primary_key("not base64!", &key_field("wrapped")).is_err());
}

#[test]
fn meta_files_parse() {
    assert_eq!(
        parse_meta(br#"{"encryptedDataKey": "abc"}"#).unwrap(),
        "abc"
    );
    assert!(parse_meta(br#"{"encryptedDataKey": ""}"#).is_err());
    assert!(parse_meta(b"{}").is_err());
}

/// The variant table of `docs/migrating-from-bigdl.md` §1.1 and this module agree.
#[test]
fn the_documented_variant_table_matches_the_code() {
    let doc = include_str!("../../../../docs/migrating-from-bigdl.md");
    let rows: Vec<Vec<&str>> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let mut seen = Vec::new();
    for row in rows.iter().filter(|r| r.len() == 4) {
        let name = row[0].split('`').nth(1).unwrap();
        let Some(variant) = Variant::from_name(name) else {
            continue;
        };
        let header_len = if row[1] == "as 2.2" {
            Variant::Legacy22.header_len()
        } else {
            row[1].split(' ').next().unwrap().parse::<usize>().unwrap()
        };
        assert_eq!(header_len, variant.header_len(), "{name}");
        assert_eq!(row[2] != "none", variant.is_authenticated(), "{name}");
        let aes = match variant {
            Variant::Legacy21 => "AES-256 key `s[16..48]`",
            Variant::NativeAesCbc => "AES key = base64-decoded `s`",
            _ => "AES-128 key `s[16..32]`",
        };
        assert!(row[3].contains(aes), "{name}: {}", row[3]);
        seen.push(variant);
    }
    assert_eq!(seen, Variant::ALL);
}
