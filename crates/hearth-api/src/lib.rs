//! hearth's front end: the Lambda REST API.
//!
//! boto3, the AWS CLI and hearth's own CLI talk to this crate exactly as they talk to AWS
//! Lambda: REST + JSON at the paths of botocore's `lambda/2015-03-31` model, signed with SigV4,
//! errors in Lambda's shapes. The layers, from the edge inwards:
//!
//! - [`router`]: routes, the SigV4 gate every request passes, the server loop ([`app`],
//!   [`serve`]). Handlers turn HTTP into plain values and back; nothing below sees HTTP.
//! - [`functions`] and [`layers`] (control plane) and [`invoke`] (data plane; [`stream`] for
//!   responses streamed as the function produces them, in [`eventstream`]'s encoding): the
//!   operations, with
//!   [`validate`] (Lambda's parameter rules) and [`model`] (the JSON wire types); [`urls`]
//!   (function URLs: their configuration, and serving them on the API's listener ahead of the
//!   SigV4 gate) and [`policy`] (resource-based policy statements, kept but not evaluated).
//! - [`store`] (metadata in redb), [`code`] (deployment packages, content-addressed and
//!   unpacked), [`logs`] (per-function invocation logs for `hearth logs`), [`download`]
//!   (the presigned URLs that `GetFunction` hands out for a package).
//! - [`invoker`]: the boundary to the worker side; the front end resolves what to run and
//!   calls an [`Invoker`](invoker::Invoker), it never runs code itself.
//! - [`error`]: the one error type ([`ApiError`]) that speaks Lambda's error shapes;
//!   [`sigv4`]: signing and verification (shared with hearth's CLI client).
//!
//! Everything lives under one data directory: `meta.redb`, `code/<sha256>/`,
//! `logs/<function>.log`, `download.key` (and `packages/<sha256>.zip` when no chunk store
//! keeps the zips).
pub use hearth_core::code;
pub mod download;
pub mod error;
pub mod events;
pub mod eventstream;
pub mod functions;
pub mod invoke;
pub mod layers;
pub use hearth_core::invoker;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod router;
pub mod sigv4;
pub mod snapstart;
pub mod state;
pub mod store;
pub mod stream;
pub mod urls;
pub mod validate;

pub use error::{ApiError, ErrorKind};
pub use router::{app, serve, serve_metrics};
pub use state::{ApiConfig, AppState, InitError};
