//! CLIP tokenization as transformers' `CLIPTokenizer` does it (`models/clip/tokenization_clip.py`,
//! a `tokenizers` BPE): NFC, whitespace runs → one space, lowercase; CLIP's pre-tokenizer regex
//! then byte-level symbols; BPE with the `</w>` word suffix; `<|startoftext|>` … `<|endoftext|>`;
//! truncated and padded to the model's 77 positions with the folder's pad token.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer pattern (the tokens it keeps).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The files of a transformers tokenizer folder.
const TOKENIZER_FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A CLIP tokenizer loaded from a pipeline's `tokenizer/` folder.
pub struct ClipTokenizer {
    /// The folder it was read from (its files are copied when a pipeline is written).
    source: std::path::PathBuf,
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

/// A token given in `tokenizer_config.json` / `special_tokens_map.json`: a string, or an
/// `AddedToken` object with `content`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    value
        .as_str()
        .map(str::to_string)
        .or_else(|| value.get("content")?.as_str().map(str::to_string))
}

impl ClipTokenizer {
    /// Loads `dir` (`vocab.json` + `merges.txt`, or `tokenizer.json`; the pad token and length from
    /// `tokenizer_config.json` / `special_tokens_map.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(
                dir,
                "tokenizer folder not found (a text-to-image pipeline needs tokenizer/ with vocab.json + merges.txt or tokenizer.json)",
            ));
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let mut tokenizer = if vocab.is_file() && merges.is_file() {
            Self::from_vocab_and_merges(&vocab, &merges)?
        } else if dir.join("tokenizer.json").is_file() {
            let path = dir.join("tokenizer.json");
            Tokenizer::from_file(&path)
                .map_err(|e| Error::file(&path, format!("not a valid tokenizer.json: {e}")))?
        } else {
            let missing = if vocab.is_file() { &merges } else { &vocab };
            return Err(Error::file(
                missing,
                "file not found (a CLIP tokenizer needs vocab.json + merges.txt, or tokenizer.json)",
            ));
        };
        let mut settings = serde_json::Map::new();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if path.is_file() {
                let text = crate::io::read_text(&path)?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
                if let Some(map) = value.as_object() {
                    settings.extend(map.clone());
                }
            }
        }
        let pad_token = settings
            .get("pad_token")
            .and_then(token_text)
            .unwrap_or_else(|| EOS.to_string());
        for (token, role) in [(BOS, "start"), (EOS, "end"), (pad_token.as_str(), "pad")] {
            if tokenizer.token_to_id(token).is_none() {
                return Err(Error::file(
                    dir,
                    format!("the {role} token `{token}` is not in the vocabulary"),
                ));
            }
        }
        // transformers registers the pad token as a special token: SD-2.x's `!` is then split out
        // of the text before BPE ("!!!" → three ids 0, not one "!!!</w>" token), and diffusers
        // feeds those ids.
        tokenizer.add_special_tokens(&[AddedToken::from(pad_token.as_str(), true)]);
        let id = |token: &str| tokenizer.token_to_id(token).expect("checked above");
        let max_length = settings
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .filter(|&n| (2..=4096).contains(&n))
            .unwrap_or(77) as usize;
        Ok(ClipTokenizer {
            source: dir.to_path_buf(),
            bos: id(BOS),
            eos: id(EOS),
            pad: id(&pad_token),
            tokenizer,
            max_length,
        })
    }

    fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token(EOS.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| {
                Error::file(
                    vocab,
                    format!("cannot read the BPE vocabulary with merges.txt: {e}"),
                )
            })?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .expect("a valid pattern")
            .into(),
            Lowercase.into(),
        ])));
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            Split::new(
                SplitPattern::Regex(CLIP_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .expect("a valid pattern")
            .into(),
            ByteLevel::default().add_prefix_space(false).into(),
        ])));
        tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        Ok(tokenizer)
    }

    /// The ids of `prompt` as a pipeline feeds them to the text encoder: BOS, at most
    /// `max_length − 2` tokens, EOS, then pad tokens up to `max_length` (77).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::Usage(format!("--prompt {prompt:?}: cannot tokenize: {e}")))?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(encoding.get_ids().iter().take(self.max_length - 2));
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// Copies the tokenizer's files into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        for name in TOKENIZER_FILES {
            let from = self.source.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from)
                    .map_err(|e| Error::file(&from, format!("cannot read: {e}")))?;
                crate::io::write_atomic(&dir.join(name), &bytes)?;
            }
        }
        Ok(())
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
}
