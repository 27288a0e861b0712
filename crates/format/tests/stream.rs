//! Round trips, tampering, truncation and random access over the streaming format.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};

use ppml_format::{
    DataKey, DecryptingReader, EncryptingWriter, FormatError, Header, KeyReference,
    RandomAccessReader, UnverifiedHeader,
};
use proptest::prelude::*;

const SEGMENT: u32 = 64;

fn encrypt(plaintext: &[u8], key: &DataKey) -> Vec<u8> {
    let header = Header::new(
        KeyReference::new("local:test", "pk-1", vec![0xAB; 60]),
        [3; 16],
        SEGMENT,
    )
    .unwrap();
    let mut writer = EncryptingWriter::new(Vec::new(), &header, key).unwrap();
    // Write in uneven pieces to exercise buffering.
    for chunk in plaintext.chunks(37) {
        writer.write_all(chunk).unwrap();
    }
    let (file, finished) = writer.finish().unwrap();
    assert_eq!(finished.plaintext_len, plaintext.len() as u64);
    assert_eq!(finished.ciphertext_len, file.len() as u64);
    file
}

fn decrypt_stream(file: &[u8], key: &DataKey) -> Result<Vec<u8>, FormatError> {
    let mut input = file;
    let header = UnverifiedHeader::read_from(&mut input)?;
    let mut reader = DecryptingReader::new(input, header, key)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(FormatError::from_io)?;
    Ok(out)
}

fn decrypt_random(file: &[u8], key: &DataKey) -> Result<Vec<u8>, FormatError> {
    let mut reader = RandomAccessReader::new(Cursor::new(file), key)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(FormatError::from_io)?;
    Ok(out)
}

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn round_trip_at_segment_boundaries() {
    let key = DataKey::generate().unwrap();
    for len in [0, 1, 63, 64, 65, 127, 128, 129, 1000] {
        let plaintext = sample(len);
        let file = encrypt(&plaintext, &key);
        assert_eq!(decrypt_stream(&file, &key).unwrap(), plaintext, "len {len}");
        assert_eq!(decrypt_random(&file, &key).unwrap(), plaintext, "len {len}");
    }
}

#[test]
fn same_plaintext_encrypts_differently_each_time() {
    let key = DataKey::generate().unwrap();
    assert_ne!(encrypt(b"hello", &key), encrypt(b"hello", &key));
}

#[test]
fn wrong_key_fails_at_the_header() {
    let key = DataKey::generate().unwrap();
    let other = DataKey::generate().unwrap();
    let file = encrypt(&sample(300), &key);
    assert!(matches!(
        decrypt_stream(&file, &other),
        Err(FormatError::HeaderAuthentication)
    ));
    assert!(matches!(
        decrypt_random(&file, &other),
        Err(FormatError::HeaderAuthentication)
    ));
}

#[test]
fn not_a_ppml_file() {
    let key = DataKey::generate().unwrap();
    for junk in [&b""[..], b"name,age,job\n", b"PPMLENC"] {
        assert!(matches!(
            decrypt_stream(junk, &key),
            Err(FormatError::NotPpml)
        ));
    }
}

#[test]
fn unknown_version_is_named() {
    let key = DataKey::generate().unwrap();
    let mut file = encrypt(b"x", &key);
    file[7] = 2;
    let err = decrypt_stream(&file, &key).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported ppml format version 2 (this build reads version 1)"
    );
}

fn header_len(file: &[u8]) -> usize {
    UnverifiedHeader::declared_len(file).unwrap()
}

#[test]
fn removing_the_final_segment_is_reported_as_truncation() {
    let key = DataKey::generate().unwrap();
    let file = encrypt(&sample(64 * 3 + 10), &key);
    let cut = header_len(&file) + 3 * (64 + 16);
    let err = decrypt_stream(&file[..cut], &key).unwrap_err();
    assert!(
        matches!(err, FormatError::Truncated { segment: 2 }),
        "{err}"
    );
    let err = decrypt_random(&file[..cut], &key).unwrap_err();
    assert!(
        matches!(err, FormatError::Truncated { segment: 2 }),
        "{err}"
    );
}

#[test]
fn swapping_segments_is_detected() {
    let key = DataKey::generate().unwrap();
    let mut file = encrypt(&sample(64 * 3 + 10), &key);
    let h = header_len(&file);
    let (a, b) = (h..h + 80, h + 80..h + 160);
    let first = file[a.clone()].to_vec();
    file.copy_within(b.clone(), a.start);
    file[b].copy_from_slice(&first);
    assert!(matches!(
        decrypt_stream(&file, &key),
        Err(FormatError::SegmentAuthentication { segment: 0 })
    ));
}

#[test]
fn random_access_reads_any_range() {
    let key = DataKey::generate().unwrap();
    let plaintext = sample(1000);
    let file = encrypt(&plaintext, &key);
    let mut reader = RandomAccessReader::new(Cursor::new(&file), &key).unwrap();
    assert_eq!(reader.plaintext_len(), 1000);
    for (start, len) in [(0, 10), (60, 10), (63, 2), (500, 200), (990, 50)] {
        reader.seek(SeekFrom::Start(start)).unwrap();
        let mut buf = vec![0; len];
        let mut got = 0;
        loop {
            let n = reader.read(&mut buf[got..]).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let end = (start as usize + len).min(1000);
        assert_eq!(&buf[..got], &plaintext[start as usize..end]);
    }
}

#[test]
fn trailing_bytes_after_final_segment_are_rejected() {
    let key = DataKey::generate().unwrap();
    let mut file = encrypt(&sample(64 * 2), &key);
    file.extend_from_slice(&[0u8; 20]);
    assert!(decrypt_stream(&file, &key).is_err());
    assert!(decrypt_random(&file, &key).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_flipped_bit_is_detected(len in 0usize..400, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let key = DataKey::generate().unwrap();
        let mut file = encrypt(&sample(len), &key);
        let at = pos.index(file.len());
        file[at] ^= 1 << bit;
        prop_assert!(decrypt_stream(&file, &key).is_err(), "flip at {} of {}", at, file.len());
        prop_assert!(decrypt_random(&file, &key).is_err(), "flip at {} of {}", at, file.len());
    }

    #[test]
    fn any_truncation_is_detected(len in 0usize..400, cut in any::<prop::sample::Index>()) {
        let key = DataKey::generate().unwrap();
        let file = encrypt(&sample(len), &key);
        let at = cut.index(file.len());
        prop_assert!(decrypt_stream(&file[..at], &key).is_err(), "cut at {} of {}", at, file.len());
        prop_assert!(decrypt_random(&file[..at], &key).is_err(), "cut at {} of {}", at, file.len());
    }

    #[test]
    fn round_trip_any_length(len in 0usize..2000) {
        let key = DataKey::generate().unwrap();
        let plaintext = sample(len);
        let file = encrypt(&plaintext, &key);
        prop_assert_eq!(decrypt_stream(&file, &key).unwrap(), plaintext.clone());
        prop_assert_eq!(decrypt_random(&file, &key).unwrap(), plaintext);
    }
}
