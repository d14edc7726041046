//! hearth worker
