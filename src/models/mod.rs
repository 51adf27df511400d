//! Models: `XConfig` (diffusers' `config.json`) + `X` (forward only).

pub mod blocks;
pub mod unet;
pub mod vae;

pub use unet::{UNet, UNetConfig};
pub use vae::{Vae, VaeConfig};
