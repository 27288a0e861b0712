//! `ppml kms serve`: the eHSM-compatible KMS server.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ppml_kms_server::{RootKey, ServerState, Store, router};

use crate::cli::KmsServeArgs;
use crate::settings::Settings;

fn root_key(args: &KmsServeArgs, data_dir: &std::path::Path) -> Result<RootKey> {
    if let Ok(hex_key) = std::env::var("PPML_KMS_ROOT_KEY") {
        return RootKey::from_hex(&hex_key).map_err(|e| anyhow::anyhow!("PPML_KMS_ROOT_KEY: {e}"));
    }
    let path = args
        .root_key_file
        .clone()
        .unwrap_or_else(|| data_dir.join("root.key"));
    if !path.exists() {
        std::fs::create_dir_all(data_dir)?;
        let (key, hex_key) = RootKey::generate().map_err(anyhow::Error::msg)?;
        ppml_kms::write_private_file_atomic(&path, format!("{}\n", *hex_key).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ppml: created a new root key in {}", path.display());
        return Ok(key);
    }
    let mode = std::fs::metadata(&path)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    );
    RootKey::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub async fn run(args: &KmsServeArgs, settings: &Settings) -> Result<()> {
    if !args.insecure_http {
        bail!(
            "TLS is not implemented yet in `ppml kms serve`; pass --insecure-http to serve plain \
             HTTP explicitly (loopback or a trusted network only)"
        );
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| settings.home.join("kms-server"));
    let root = root_key(args, &data_dir)?;
    let store = Store::open(&data_dir, root)
        .map_err(|e| anyhow::anyhow!("opening the store in {}: {e}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::warn!("serving plain HTTP (--insecure-http)");
    // Scripts wait for this line (with the real port when --listen ends in :0).
    println!("ppml kms listening on http://{addr}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    axum::serve(listener, router(Arc::new(ServerState::new(store))))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
