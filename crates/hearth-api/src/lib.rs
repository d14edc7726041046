//! hearth's front end: the Lambda REST API.
pub mod invoker;
