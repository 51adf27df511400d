//! `fewstep tokenize`: the CLIP token ids of prompts, as the pipeline's text encoder gets them.

use std::path::PathBuf;

use crate::error::Result;
use crate::pipeline::TOKENIZER_DIR;
use crate::text::ClipTokenizer;

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// A text-to-image pipeline folder (its `tokenizer/`), or a tokenizer folder itself.
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt (repeat for several).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let dir = if args.model.join(TOKENIZER_DIR).is_dir() {
        args.model.join(TOKENIZER_DIR)
    } else if args.model.join("model_index.json").is_file() {
        return Err(crate::error::Error::file(
            args.model.join(TOKENIZER_DIR),
            "tokenizer folder not found (a text-to-image pipeline needs tokenizer/)",
        ));
    } else {
        args.model.clone()
    };
    let tokenizer = ClipTokenizer::load(&dir)?;
    for prompt in &args.prompt {
        let ids = tokenizer.encode(prompt)?;
        // Keys in this order (serde_json's maps would sort them).
        println!(
            "{{\"prompt\": {}, \"ids\": {}}}",
            serde_json::Value::from(prompt.as_str()),
            serde_json::Value::from(ids)
        );
    }
    Ok(())
}
