//! `ppml encrypt` and `ppml decrypt` over [`ppml_engine::files`].

use anyhow::Result;
use ppml_engine::files::{
    DecryptOptions, DecryptOutput, EncryptOptions, EncryptSummary, decrypt_converted,
    decrypt_dataset, encrypt_paths,
};

use ppml_engine::pme::{PmeOptions, parse_column_key};

use crate::cli::{DecryptArgs, EncryptArgs};
use crate::progress::ByteBar;
use crate::settings::Settings;

pub async fn encrypt(args: &EncryptArgs, settings: &mut Settings) -> Result<EncryptSummary> {
    if args.partitions == 0 {
        crate::usage_bail!("--partitions must be at least 1");
    }
    let kms = settings.open_kms().await?;
    let bar = ByteBar::new("encrypting", settings.quiet);
    let options = EncryptOptions {
        partitions: args.partitions,
        has_header: !args.no_header,
        check_rows: !args.no_row_check,
        segment_size: args.segment_size,
        overwrite: args.overwrite,
        durability: settings.durability,
        to: args.to,
        parquet: PmeOptions {
            column_keys: args
                .column_keys
                .iter()
                .map(|spec| match parse_column_key(spec) {
                    Ok(key) => Ok(key),
                    Err(e) => crate::usage_bail!("--column-key: {e}"),
                })
                .collect::<Result<_>>()?,
            plaintext_footer: args.plaintext_footer,
        },
    };
    let key_service = kms.kms();
    let summary = encrypt_paths(
        key_service.as_ref(),
        kms.primary()?,
        &args.input,
        &args.out,
        &options,
        &bar,
    )
    .await?;
    bar.finish();
    Ok(summary)
}

pub async fn decrypt(args: &DecryptArgs, settings: &mut Settings) -> Result<u64> {
    let mut kms = settings.open_kms_for_runtime().await?;
    // An attested decryption is a job too: it runs under the owner's grant.
    if matches!(kms.backend, ppml::KmsBackend::Attested(_))
        && let Some(grant) = settings
            .job_grant(
                ppml::grant::GrantedJob::Decrypt(&args.input),
                &settings.grant_options,
            )
            .await?
    {
        kms = kms.under_grant(&grant)?;
    }
    let options = DecryptOptions {
        overwrite: args.overwrite,
        durability: settings.durability,
    };
    let mut stdout;
    let (output, quiet) = match (&args.out_dir, &args.out) {
        (Some(dir), _) => (DecryptOutput::Dir(dir), settings.quiet),
        (None, Some(out)) if out.as_os_str() == "-" => {
            stdout = std::io::BufWriter::with_capacity(1 << 18, std::io::stdout());
            (DecryptOutput::Stream(&mut stdout), true)
        }
        (None, Some(out)) => (DecryptOutput::File(out), settings.quiet),
        (None, None) => unreachable!("clap requires --out or --out-dir"),
    };
    let key_service = kms.kms();
    if let Some(to) = args.to {
        return Ok(decrypt_converted(key_service, &args.input, output, to, &options).await?);
    }
    let bar = ByteBar::new("decrypting", quiet);
    let bytes = decrypt_dataset(key_service.as_ref(), &args.input, output, &options, &bar).await?;
    bar.finish();
    Ok(bytes)
}
