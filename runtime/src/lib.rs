//! loopc runtime: loads an artifact and runs it.
pub mod artifact;
