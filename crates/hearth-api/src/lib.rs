//! hearth's front end: the Lambda REST API.
pub mod error;
pub mod invoker;
pub mod sigv4;
