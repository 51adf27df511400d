//! Distillation objectives, one per file, as pure functions returning a per-sample loss.

pub mod progressive;
