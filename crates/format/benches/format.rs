//! Micro-benchmarks of the file format: streaming encryption and decryption (whole segments,
//! AES-256-GCM), and random access (one 4 KiB read, which opens the one segment covering it).
//! `cargo bench -p ppml-format`; figures and their command are in BENCHMARKS.md.

use std::io::{Cursor, Read, Write};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ppml_format::{
    DEFAULT_SEGMENT_SIZE, DataKey, DecryptingReader, EncryptingWriter, Header, KeyReference,
    RandomAccessReader, UnverifiedHeader,
};

const LEN: usize = 16 << 20;

fn plaintext() -> Vec<u8> {
    // CSV-like bytes; AES-GCM's speed does not depend on them.
    b"name,age,job\nabcdef,42,Developer\n"
        .iter()
        .cycle()
        .take(LEN)
        .copied()
        .collect()
}

fn encrypt(data: &[u8], key: &DataKey) -> Vec<u8> {
    let header = Header::new(
        KeyReference::new("bench", "primary", vec![0xAA; 60]),
        [7; 16],
        DEFAULT_SEGMENT_SIZE,
    )
    .unwrap();
    let mut writer =
        EncryptingWriter::new(Vec::with_capacity(LEN + LEN / 64), &header, key).unwrap();
    writer.write_all(data).unwrap();
    writer.finish().unwrap().0
}

fn bench(c: &mut Criterion) {
    let key = DataKey::generate().unwrap();
    let data = plaintext();
    let file = encrypt(&data, &key);

    let mut group = c.benchmark_group("format");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.sample_size(20);
    group.bench_function("encrypt_stream_16MiB", |b| b.iter(|| encrypt(&data, &key)));
    let mut out = vec![0u8; LEN];
    group.bench_function("decrypting_reader_16MiB", |b| {
        b.iter(|| {
            let mut input = &file[..];
            let header = UnverifiedHeader::read_from(&mut input).unwrap();
            let mut reader = DecryptingReader::new(input, header, &key).unwrap();
            reader.read_exact(&mut out).unwrap();
        })
    });
    group.finish();

    let mut group = c.benchmark_group("format");
    group.throughput(Throughput::Bytes(4096));
    let mut random = RandomAccessReader::new(Cursor::new(&file[..]), &key).unwrap();
    let mut buf = [0u8; 4096];
    let mut offset = 0u64;
    group.bench_function("random_access_read_4KiB", |b| {
        b.iter(|| {
            offset = (offset + 1_000_003) % (LEN as u64 - 4096);
            random.read_at(offset, &mut buf).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
