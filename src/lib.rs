//! fewstep: few-step generation by distillation (progressive, consistency/LCM, KD-GAN), on burn.
//!
//! Floors, top down: `cli` → `sample` → `models` → `fewstep_schedulers`. The backend is picked
//! once, in [`backend`].

pub mod backend;
pub mod cli;
pub mod data;
pub mod denoiser;
pub mod distill;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod image_grid;
pub mod io;
pub mod metrics;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod sample;
pub mod text;
pub mod train;

pub use error::{Error, Result};
