//! `ppml import bigdl` over [`ppml_engine::bigdl`].

use std::sync::Arc;

use anyhow::{Context as _, Result};
use ppml_engine::bigdl::{BigDlKeys, ImportOptions, ImportSummary, import_bigdl};
use zeroize::Zeroizing;

use crate::cli::ImportBigdlArgs;
use crate::progress::ByteBar;
use crate::settings::Settings;

/// The first line of a BigDL key file, trimmed.
fn first_line(path: &std::path::Path) -> Result<Zeroizing<String>> {
    let line = ppml_engine::bigdl::read_key_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    if line.is_empty() {
        crate::usage_bail!("{} is empty", path.display());
    }
    Ok(line)
}

pub async fn bigdl(args: &ImportBigdlArgs, settings: &mut Settings) -> Result<ImportSummary> {
    let kms = settings.open_kms().await?;
    let key_service = kms.kms();
    let keys = match (
        &args.primary_key_plaintext,
        &args.primary_key_id,
        &args.primary_key_path,
    ) {
        (Some(plaintext), _, _) => {
            let text = match plaintext.strip_prefix('@') {
                Some(path) => first_line(std::path::Path::new(path))?,
                None => Zeroizing::new(plaintext.trim().to_string()),
            };
            BigDlKeys::PlaintextPrimaryKey(Arc::new(text))
        }
        (None, Some(id), _) => BigDlKeys::Kms {
            kms: key_service.clone(),
            primary_key_id: id.trim().to_string(),
        },
        (None, None, Some(path)) => BigDlKeys::Kms {
            kms: key_service.clone(),
            primary_key_id: first_line(path)?.to_string(),
        },
        (None, None, None) => crate::usage_bail!(
            "give the BigDL primary key: --primary-key-path, --primary-key-id or \
             --primary-key-plaintext"
        ),
    };
    let wrapped_data_key = match &args.data_key_path {
        Some(path) => Some(first_line(path)?.to_string()),
        None => None,
    };
    let options = ImportOptions {
        variant: args.variant,
        wrapped_data_key,
        allow_unauthenticated: args.allow_unauthenticated,
        has_header: !args.no_header,
        segment_size: args.segment_size,
        overwrite: args.overwrite,
        durability: settings.durability,
    };
    let bar = ByteBar::new("importing", settings.quiet);
    let summary = import_bigdl(
        &keys,
        &args.input,
        key_service.as_ref(),
        kms.primary()?,
        &args.out,
        &options,
        &bar,
    )
    .await?;
    bar.finish();
    Ok(summary)
}
