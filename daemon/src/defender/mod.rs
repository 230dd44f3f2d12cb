//! The defender agent (work in progress).

pub mod detect;
pub mod proc;
pub mod report;
