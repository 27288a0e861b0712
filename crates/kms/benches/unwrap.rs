//! Micro-benchmark of data-key unwrap with the embedded KMS (the per-file cost of opening a
//! dataset part): AES-GCM unseal of the data key under the app's primary key.
//! `cargo bench -p ppml-kms`.

use criterion::{Criterion, criterion_group, criterion_main};
use ppml_kms::{KeyManagementService as _, LocalKms};

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    LocalKms::init(dir.path()).unwrap();
    let creds = LocalKms::enroll(dir.path()).unwrap();
    let kms = LocalKms::open(dir.path(), &creds).unwrap();
    let (primary, reference) = runtime.block_on(async {
        let primary = kms.create_primary_key().await.unwrap();
        let (_, reference) = kms.generate_data_key(&primary, b"dataset").await.unwrap();
        (primary, reference)
    });
    c.bench_function("kms/local_unwrap_data_key", |b| {
        b.iter(|| {
            runtime
                .block_on(kms.unwrap_data_key(&reference, b"dataset"))
                .unwrap()
        })
    });
    c.bench_function("kms/local_generate_data_key", |b| {
        b.iter(|| {
            runtime
                .block_on(kms.generate_data_key(&primary, b"dataset"))
                .unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
