//! The defender agent (work in progress).

pub mod proc;
pub mod report;
