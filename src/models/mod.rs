//! Models: `XConfig` (diffusers' `config.json`) + `X` (forward only).

pub mod blocks;
pub mod clip;
pub mod conditioning;
pub mod feature_heads;
pub mod feature_net;
pub mod footprint;
pub mod gan;
pub mod inception;
pub mod lora;
pub mod quant;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod widen;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use conditioning::Conditioning;
pub use feature_net::{FeatureNet, FeatureNetConfig};
pub use unet::{UNet, UNetConfig};
pub use vae::{Vae, VaeConfig};

use crate::error::{Error, Result};

/// Parses a diffusers `config.json` into a config struct; a wrong type names the field path.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    // An array would fill the struct's fields by position: a config is an object.
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Config(format!("not a valid config.json: {e}")))?;
    if !value.is_object() {
        return Err(Error::Config(
            "not a valid config.json: expected a JSON object".into(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // A syntax error or a document that is not an object has no field to name.
        if path == "?" || path == "." || path.is_empty() {
            Error::Config(format!("not a valid config.json: {}", e.inner()))
        } else {
            Error::Config(format!("field `{path}`: {}", e.inner()))
        }
    })
}

/// A config as diffusers writes it: the fields plus `_class_name` and `_diffusers_version`.
pub(crate) fn diffusers_json<T: serde::Serialize>(
    config: &T,
    class_name: &str,
) -> serde_json::Value {
    let mut v = serde_json::to_value(config).expect("config serialises");
    let m = v.as_object_mut().expect("a config is a JSON object");
    m.insert("_class_name".into(), class_name.into());
    m.insert("_diffusers_version".into(), "0.31.0".into());
    v
}
