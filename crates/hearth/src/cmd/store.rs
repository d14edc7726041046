//! `hearth store`: inspect and collect the chunk store of a data directory.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Chunks, bytes and manifests stored.
    Usage {
        #[arg(long, env = "HEARTH_DATA_DIR", default_value_os_t = super::default_data_dir())]
        data_dir: PathBuf,
    },
    /// Delete chunks no manifest uses (safe while `hearth up` runs if the grace period is at
    /// least that server's `--gc-grace`: chunks younger than it are kept, so its uploads in
    /// flight are never collected).
    Gc {
        #[arg(long, env = "HEARTH_DATA_DIR", default_value_os_t = super::default_data_dir())]
        data_dir: PathBuf,
        /// Keep unreferenced chunks younger than this many seconds.
        #[arg(long, default_value_t = hearth_store::DEFAULT_GC_GRACE.as_secs())]
        grace_seconds: u64,
    },
}

fn open(data_dir: &std::path::Path) -> anyhow::Result<hearth_store::ChunkStore> {
    let key = data_dir.join("store.key");
    anyhow::ensure!(
        key.is_file(),
        "{} has no chunk store (no store.key)",
        data_dir.display()
    );
    let secrets = hearth_store::Secrets::load_or_create(&key).context("loading store.key")?;
    Ok(hearth_store::ChunkStore::local(
        &data_dir.join("store"),
        None,
        secrets,
    )?)
}

pub fn run(cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            StoreCmd::Usage { data_dir } => {
                let u = open(&data_dir)?.usage().await?;
                println!(
                    "chunks {}  bytes {}  manifests {}",
                    u.chunks, u.bytes, u.manifests
                );
            }
            StoreCmd::Gc {
                data_dir,
                grace_seconds,
            } => {
                let r = open(&data_dir)?
                    .with_gc_grace(Duration::from_secs(grace_seconds))
                    .collect_garbage()
                    .await?;
                println!(
                    "scanned {}  deleted {}  freed {} bytes  kept {} (young {})",
                    r.scanned, r.deleted, r.bytes_freed, r.kept, r.kept_young
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
