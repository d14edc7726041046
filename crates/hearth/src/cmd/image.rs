//! `hearth image`: build, import and list runtime images.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use hearth_worker::images::{ImageState, ImageStore, RECIPES, recipe_for};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build runtime images with mmdebstrap (all missing ones when no name is given).
    Build {
        /// Runtime to build (python3.11, python3.13, nodejs22.x, nodejs24.x, provided); all
        /// when omitted.
        name: Option<String>,
        /// Rebuild even if the image is cached.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        dir: ImageDir,
    },
    /// Import a root file system from a directory or a tarball.
    Import {
        /// Name to store it under (use a runtime name, e.g. `provided`, to replace that runtime).
        name: String,
        /// A directory or a tar archive (optionally compressed).
        source: PathBuf,
        #[command(flatten)]
        dir: ImageDir,
    },
    /// List runtime images.
    Ls {
        #[command(flatten)]
        dir: ImageDir,
    },
}

#[derive(clap::Args)]
pub struct ImageDir {
    /// Image cache directory (default: <data-dir>/images).
    #[arg(long, env = "HEARTH_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value_os_t = super::default_data_dir())]
    pub data_dir: PathBuf,
}

impl ImageDir {
    pub fn store(&self) -> ImageStore {
        ImageStore::new(
            self.image_cache
                .clone()
                .unwrap_or_else(|| self.data_dir.join("images")),
        )
    }
}

/// Print a progress line with elapsed time.
pub fn progress_printer() -> impl FnMut(&str) {
    let start = std::time::Instant::now();
    move |line: &str| eprintln!("[{:>5.1}s] {line}", start.elapsed().as_secs_f64())
}

pub fn run(cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Build { name, force, dir } => {
            let store = dir.store();
            let mut progress = progress_printer();
            match name {
                Some(n) => {
                    let recipe = recipe_for(&n)?;
                    if force || store.state(recipe) != ImageState::Current {
                        store
                            .build(recipe, &mut progress)
                            .with_context(|| format!("building {n}"))?;
                    } else {
                        progress(&format!("{}: cached (use --force to rebuild)", recipe.name));
                    }
                }
                None if force => {
                    for r in RECIPES {
                        store.build(r, &mut progress)?;
                    }
                }
                None => store.ensure_all(&mut progress)?,
            }
        }
        ImageCmd::Import { name, source, dir } => {
            let root = dir
                .store()
                .import(&name, &source, &mut progress_printer())?;
            println!("{}", root.display());
        }
        ImageCmd::Ls { dir } => {
            let store = dir.store();
            for r in RECIPES {
                match (store.state(r), store.rootfs(r.name)) {
                    (ImageState::Current, Ok(p)) => {
                        println!("{:<12} built     {}", r.name, p.display())
                    }
                    (ImageState::Stale, Ok(p)) => println!(
                        "{:<12} stale     {} (an older recipe: hearth image build {})",
                        r.name,
                        p.display(),
                        r.name
                    ),
                    _ => println!("{:<12} missing   (hearth image build {})", r.name, r.name),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
