//! One module per subcommand.
pub mod assign;
pub mod bench;
pub mod bench_assign;
pub mod bench_cluster;
pub mod client;
pub mod cluster;
pub mod image;
pub mod store;
pub mod up;

use std::path::PathBuf;

/// Where the static agent binary is: `$HEARTH_AGENT`, else beside this executable, else in the
/// static build's target directory (`target/x86_64-unknown-linux-gnu/<profile>/hearth-agent`).
pub fn find_agent(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let mut candidates = Vec::new();
    if let Some(target) = dir.parent() {
        for profile in ["release", "debug"] {
            candidates.push(
                target
                    .join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join("hearth-agent"),
            );
        }
    }
    candidates.push(dir.join("hearth-agent-static"));
    candidates.push(dir.join("hearth-agent"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// Default data directory: `./.hearth`.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(".hearth")
}
