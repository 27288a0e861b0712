//! `ppml kms-utils`: BigDL's kms-utils commands (`entrypoint.sh ACTION APPID APIKEY [PATH]`)
//! with BigDL's positional arguments and environment (`KMS_TYPE`, `EHSM_KMS_IP`,
//! `EHSM_KMS_PORT`), on ppml's datasets and KMS (docs/migrating-from-bigdl.md §5).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use ppml_engine::bigdl::{BigDlKeys, ImportOptions, decrypt_bigdl};
use ppml_engine::files::{DecryptOptions, DecryptOutput, EncryptOptions, encrypt_paths};

use crate::cli::KmsUtilsArgs;
use crate::progress::ByteBar;
use crate::settings::Settings;

const PRIMARY_KEY_FILE: &str = "ehsm_encrypted_primary_key";
const DATA_KEY_FILE: &str = "ehsm_encrypted_data_key";

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut text = path.as_os_str().to_os_string();
    text.push(suffix);
    PathBuf::from(text)
}

/// The KMS of BigDL's variables (when ppml's own settings name none) and the app of the
/// positional arguments.
fn kms_settings(args: &KmsUtilsArgs, settings: &mut Settings, needs_app: bool) -> Result<()> {
    match std::env::var("KMS_TYPE").ok().as_deref().map(str::trim) {
        None | Some("" | "ehsm") => {}
        Some(other) => crate::usage_bail!(
            "KMS_TYPE={other}: ppml's kms-utils speak to an eHSM-API KMS (ppml's server or \
             eHSM): KMS_TYPE=ehsm. SimpleKeyManagementService keys can be computed by anyone; \
             Azure Key Vault is not supported"
        ),
    }
    if settings.kms_url.is_none() {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if let (Some(ip), Some(port)) = (var("EHSM_KMS_IP"), var("EHSM_KMS_PORT")) {
            settings.kms_url = Some(format!("https://{}:{}", ip.trim(), port.trim()));
        }
    }
    if settings.kms_url.is_none() {
        crate::usage_bail!("no KMS: set EHSM_KMS_IP and EHSM_KMS_PORT (or --kms-url)");
    }
    if needs_app {
        let [appid, apikey, ..] = args.args.as_slice() else {
            crate::usage_bail!("kms-utils {} needs APPID APIKEY", args.action);
        };
        settings.appid = Some(appid.clone());
        settings.apikey = Some(apikey.clone());
    }
    Ok(())
}

fn path_argument(args: &KmsUtilsArgs) -> Result<PathBuf> {
    match args.args.get(2) {
        Some(path) => Ok(PathBuf::from(path)),
        None => crate::usage_bail!("kms-utils {} needs APPID APIKEY PATH", args.action),
    }
}

fn read_key_file(path: &Path) -> Result<String> {
    let line = ppml_engine::bigdl::read_key_file(path).with_context(|| {
        format!(
            "reading {} (run `ppml kms-utils generatekeys APPID APIKEY` first)",
            path.display()
        )
    })?;
    Ok(line.to_string())
}

pub async fn run(args: &KmsUtilsArgs, settings: &mut Settings) -> Result<()> {
    match args.action.as_str() {
        "enroll" => {
            kms_settings(args, settings, false)?;
            let remote = settings
                .connect_remote_anonymous()
                .await?
                .context("no KMS server")?;
            let creds = remote.enroll().await?;
            println!("appid = \"{}\"", creds.appid);
            println!("apikey = \"{}\"", *creds.apikey);
        }
        "generatekeys" => {
            kms_settings(args, settings, true)?;
            let kms = settings.open_kms().await?;
            let service = kms.kms();
            let primary = service.create_primary_key().await?;
            // BigDL's data key file: a data key wrapped under the primary key with BigDL's
            // aad, for BigDL tools that still want one (ppml makes a key per dataset).
            let wrapped = match kms.backend.remote() {
                Some(remote) => Some(
                    remote
                        .generate_data_key_without_plaintext(
                            &primary.0,
                            32,
                            ppml_format::bigdl::EHSM_AAD,
                        )
                        .await?,
                ),
                None => None,
            };
            std::fs::create_dir_all(&args.key_dir)
                .with_context(|| format!("creating {}", args.key_dir.display()))?;
            let write = |name: &str, text: &str| -> Result<()> {
                let path = args.key_dir.join(name);
                ppml_kms::write_private_file_atomic(&path, text.as_bytes())
                    .with_context(|| format!("writing {}", path.display()))
            };
            write(PRIMARY_KEY_FILE, &primary.0)?;
            if let Some(wrapped) = wrapped {
                write(DATA_KEY_FILE, &wrapped)?;
            }
            eprintln!(
                "primary key {} in {}",
                primary.0,
                args.key_dir.join(PRIMARY_KEY_FILE).display()
            );
        }
        action @ ("encrypt" | "encryptwithrepartition") => {
            kms_settings(args, settings, true)?;
            let input = path_argument(args)?;
            let primary = ppml::PrimaryKeyId(read_key_file(&args.key_dir.join(PRIMARY_KEY_FILE))?);
            let kms = settings.open_kms().await?;
            let output = with_suffix(&input, ".encrypted");
            let options = EncryptOptions {
                partitions: if action == "encrypt" { 1 } else { 4 },
                durability: settings.durability,
                ..EncryptOptions::default()
            };
            let bar = ByteBar::new("encrypting", settings.quiet);
            let summary = encrypt_paths(
                kms.kms().as_ref(),
                &primary,
                &input,
                output.as_path(),
                &options,
                &bar,
            )
            .await?;
            bar.finish();
            eprintln!(
                "encrypted {} bytes into {} part(s) in {}",
                summary.plaintext_bytes,
                summary.parts,
                output.display()
            );
        }
        "decrypt" => {
            kms_settings(args, settings, true)?;
            let input = path_argument(args)?;
            let output = with_suffix(&input, ".decrypted");
            let kms = settings.open_kms().await?;
            let bar = ByteBar::new("decrypting", settings.quiet);
            if input
                .join(ppml_format::manifest::MANIFEST_FILE_NAME)
                .is_file()
            {
                let options = DecryptOptions {
                    overwrite: false,
                    durability: settings.durability,
                };
                ppml_engine::files::decrypt_dataset(
                    kms.kms().as_ref(),
                    &input.as_path().into(),
                    DecryptOutput::Dir(&output),
                    &options,
                    &bar,
                )
                .await?;
            } else {
                // A BigDL dataset: its data key is unwrapped under the primary key file's key.
                let keys = BigDlKeys::Kms {
                    kms: kms.kms(),
                    primary_key_id: read_key_file(&args.key_dir.join(PRIMARY_KEY_FILE))?,
                };
                let options = ImportOptions {
                    durability: settings.durability,
                    ..ImportOptions::default()
                };
                decrypt_bigdl(&keys, &input, &output, &options, &bar).await?;
            }
            bar.finish();
            eprintln!("decrypted into {}", output.display());
        }
        other => crate::usage_bail!(
            "unknown kms-utils action {other:?}: enroll, generatekeys, encrypt, \
             encryptwithrepartition or decrypt"
        ),
    }
    Ok(())
}
