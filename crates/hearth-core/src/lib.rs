//! What hearth's parts share, so that none depends on another's implementation: the front end
//! (`hearth-api`) and the worker (`hearth-worker`) both depend on this crate and not on each
//! other.
//!
//! - [`invoker`]: the boundary between front end and workers: [`invoker::FunctionSpec`] (one
//!   immutable function version), invocations and their results, the [`invoker::Invoker`]
//!   trait, and [`invoker::InvokeError`] with what a caller should do about each error
//!   ([`invoker::NextStep`]).
//! - [`code`]: deployment packages: validating and unpacking zips into the content-addressed
//!   code store, and the chunk-store artifact name of a package.
//! - [`runtimes`]: the runtime catalogue.
//! - [`eventlog`]: where the asynchronous queue stores its events ([`eventlog::EventLog`]).
pub mod code;
pub mod eventlog;
pub mod invoker;
pub mod runtimes;
