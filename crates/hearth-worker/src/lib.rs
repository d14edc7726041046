//! hearth's worker: runtime images, the runsc sandbox engine, the agent's host side and the
//! pool that assigns invocations to sandboxes.
pub mod affinity;
pub mod artifacts;
pub mod cgroup;
pub mod demand;
pub mod engine;
pub mod evict;
pub mod fake;
pub mod frames;
pub mod images;
pub mod ksm;
pub mod layers;
pub mod netns;
pub mod pool;
pub mod prewarm;
pub mod probe;
pub mod scaling;
pub mod scratch;
pub mod sentry;
pub mod snapshots;
pub mod tmpdisk;

pub use engine::{Engine, EngineConfig, RunscEngine};
pub use images::ImageStore;
pub use pool::{Worker, WorkerConfig};
