//! hearth front end
