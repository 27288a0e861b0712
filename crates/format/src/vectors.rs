//! Test vectors in the manner of C2SP's CCTV: one expected outcome per file, produced by the
//! generator below, and one test that runs every vector through both the streaming and the
//! random-access reader. The files live in `testdata/vectors/` so other implementations can
//! use them; their format is described in `testdata/vectors/README.md`.
//!
//! Regenerate with `PPML_WRITE_VECTORS=1 cargo test -p ppml-format vectors`.

use std::fmt::Write as _;
use std::io::{Cursor, Read, Write};
use std::path::PathBuf;

use aws_lc_rs::digest;

use crate::{
    DataKey, DecryptingReader, EncryptingWriter, FormatError, Header, KeyReference,
    RandomAccessReader, TAG_LEN, UnverifiedHeader,
};

const SEGMENT: u32 = 64;
const KEY: [u8; 32] = [0x42; 32];

fn dir() -> PathBuf {
    // `cargo test` sets CARGO_MANIFEST_DIR when it runs the test too; prefer that over the
    // compile-time value, which is stale when a cached test binary was built in another clone.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("testdata/vectors")
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"ppml test vector "[i % 17]).collect()
}

fn encrypt(len: usize) -> (Vec<u8>, Vec<u8>) {
    let header = Header::new(
        KeyReference::new("local:vectors", "primary-key-1", vec![0xAA; 61]),
        [0x11; 16],
        SEGMENT,
    )
    .unwrap()
    .with_salt([0x5A; 32]);
    let key = DataKey::from_bytes(KEY);
    let data = plaintext(len);
    let mut writer = EncryptingWriter::new(Vec::new(), &header, &key).unwrap();
    writer.write_all(&data).unwrap();
    (writer.finish().unwrap().0, data)
}

struct Vector {
    name: &'static str,
    expect: &'static str,
    comment: &'static str,
    file: Vec<u8>,
    plaintext: Option<Vec<u8>>,
}

fn header_len(file: &[u8]) -> usize {
    UnverifiedHeader::declared_len(file).unwrap()
}

fn vectors() -> Vec<Vector> {
    let seg = SEGMENT as usize + TAG_LEN;
    let ok = |name, len: usize, comment| {
        let (file, data) = encrypt(len);
        Vector {
            name,
            expect: "success",
            comment,
            file,
            plaintext: Some(data),
        }
    };
    let bad = |name, expect, comment, edit: &dyn Fn(&mut Vec<u8>)| {
        let (mut file, _) = encrypt(200);
        edit(&mut file);
        Vector {
            name,
            expect,
            comment,
            file,
            plaintext: None,
        }
    };
    vec![
        ok("empty", 0, "empty plaintext: one empty final segment"),
        ok("one_byte", 1, "a single byte"),
        ok(
            "one_full_segment",
            64,
            "exactly one segment, which is final",
        ),
        ok(
            "segment_plus_one",
            65,
            "a full segment and a final one-byte segment",
        ),
        ok(
            "three_and_a_half",
            200,
            "three full segments and a final partial one",
        ),
        bad(
            "header_salt_flipped",
            "header failure",
            "a salt byte flipped: the header MAC fails",
            &|f| f[30] ^= 1,
        ),
        bad(
            "header_tag_flipped",
            "header failure",
            "the last header byte (MAC) flipped",
            &|f| {
                let at = header_len(f) - 1;
                f[at] ^= 0x80
            },
        ),
        bad(
            "wrapped_key_flipped",
            "header failure",
            "a wrapped-key byte flipped",
            &|f| {
                let at = header_len(f) - 40;
                f[at] ^= 4
            },
        ),
        bad(
            "segment_flipped",
            "payload failure",
            "a ciphertext byte of segment 1 flipped",
            &|f| {
                let at = header_len(f) + seg + 5;
                f[at] ^= 1
            },
        ),
        bad(
            "final_segment_removed",
            "truncated",
            "the file ends after segment 2, not final",
            &|f| {
                let at = header_len(f) + 3 * seg;
                f.truncate(at)
            },
        ),
        bad(
            "cut_inside_segment",
            "payload failure",
            "the file ends 10 bytes into the final segment",
            &|f| {
                let at = header_len(f) + 3 * seg + 10;
                f.truncate(at)
            },
        ),
        bad(
            "segments_swapped",
            "payload failure",
            "segments 0 and 1 swapped",
            &|f| {
                let h = header_len(f);
                let first = f[h..h + seg].to_vec();
                f.copy_within(h + seg..h + 2 * seg, h);
                f[h + seg..h + 2 * seg].copy_from_slice(&first);
            },
        ),
        bad(
            "trailing_bytes",
            "payload failure",
            "16 zero bytes after the final segment",
            &|f| f.extend_from_slice(&[0; 16]),
        ),
        bad(
            "bad_magic",
            "not ppml",
            "the magic's first byte changed",
            &|f| f[0] = b'Q',
        ),
        bad(
            "version_2",
            "unsupported version",
            "the magic's version byte is 2",
            &|f| f[7] = 2,
        ),
        bad(
            "header_too_short",
            "header failure",
            "header_len field lowered by one",
            &|f| f[11] -= 1,
        ),
        bad(
            "header_only",
            "payload failure",
            "all segments removed",
            &|f| {
                let at = header_len(f);
                f.truncate(at)
            },
        ),
    ]
}

fn classify(err: &FormatError) -> &'static str {
    match err {
        FormatError::NotPpml => "not ppml",
        FormatError::UnsupportedVersion(_) => "unsupported version",
        FormatError::MalformedHeader(_) | FormatError::HeaderAuthentication => "header failure",
        FormatError::Truncated { .. } => "truncated",
        FormatError::SegmentAuthentication { .. } | FormatError::BadLength(_) => "payload failure",
        other => panic!("unexpected error class: {other}"),
    }
}

fn outcome(result: Result<Vec<u8>, FormatError>, want_payload: Option<&str>) -> String {
    match result {
        Ok(data) => {
            let hash = hex::encode(digest::digest(&digest::SHA256, &data));
            if let Some(want) = want_payload {
                assert_eq!(hash, want, "payload hash");
            }
            "success".into()
        }
        Err(e) => classify(&e).into(),
    }
}

fn read_streaming(file: &[u8], key: &DataKey) -> Result<Vec<u8>, FormatError> {
    let mut input = file;
    let header = UnverifiedHeader::read_from(&mut input)?;
    let mut reader = DecryptingReader::new(input, header, key)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(FormatError::from_io)?;
    Ok(out)
}

fn read_random(file: &[u8], key: &DataKey) -> Result<Vec<u8>, FormatError> {
    let mut reader = RandomAccessReader::new(Cursor::new(file), key)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(FormatError::from_io)?;
    Ok(out)
}

fn render(v: &Vector) -> String {
    let mut out = String::new();
    writeln!(out, "expect: {}", v.expect).unwrap();
    writeln!(out, "data key: {}", hex::encode(KEY)).unwrap();
    if let Some(p) = &v.plaintext {
        writeln!(
            out,
            "payload: {}",
            hex::encode(digest::digest(&digest::SHA256, p))
        )
        .unwrap();
    }
    writeln!(out, "comment: {}", v.comment).unwrap();
    out.push('\n');
    for line in v.file.chunks(32) {
        out.push_str(&hex::encode(line));
        out.push('\n');
    }
    out
}

#[test]
fn vectors_match_their_expectations() {
    if std::env::var_os("PPML_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for v in vectors() {
            std::fs::write(dir().join(v.name), render(&v)).unwrap();
        }
    }
    let key = DataKey::from_bytes(KEY);
    let mut count = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "README.md" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let (head, body) = text.split_once("\n\n").unwrap();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_string)
        };
        let expect = field("expect").unwrap();
        let payload = field("payload");
        assert_eq!(field("data key").unwrap(), hex::encode(KEY));
        let file = hex::decode(body.split_whitespace().collect::<String>()).unwrap();
        let name = path.display();
        assert_eq!(
            outcome(read_streaming(&file, &key), payload.as_deref()),
            expect,
            "{name} (streaming)"
        );
        assert_eq!(
            outcome(read_random(&file, &key), payload.as_deref()),
            expect,
            "{name} (random access)"
        );
        count += 1;
    }
    assert_eq!(count, vectors().len(), "vector files vs generator");
}

#[test]
fn committed_vectors_are_what_the_generator_writes() {
    for v in vectors() {
        let committed = std::fs::read_to_string(dir().join(v.name))
            .unwrap_or_else(|_| panic!("missing vector {}: regenerate", v.name));
        assert_eq!(
            committed,
            render(&v),
            "{} differs from the generator",
            v.name
        );
    }
}
