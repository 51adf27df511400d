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

    /// The id of the end token (where a CLIP text model's pooled output is read).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// GPT-2/CLIP's reversible map from bytes to printable characters (`bytes_to_unicode`): the
/// symbols of a byte-level BPE vocabulary, in CLIP's vocabulary order.
fn byte_symbols() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars
        .into_iter()
        .map(|c| char::from_u32(c).expect("a valid char"))
        .collect()
}

/// Learns BPE merges over `words` (each counted once) until every word is one symbol: the most
/// frequent adjacent pair first, ties by the pair's text. Applying the merges in this order
/// reproduces the segmentation (one token per word), as BPE encoding does.
pub fn learn_word_merges(words: &[&str]) -> Vec<(String, String)> {
    let mut segmented: Vec<Vec<String>> = words
        .iter()
        .map(|w| {
            let chars: Vec<char> = w.chars().collect();
            chars
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i + 1 == chars.len() {
                        format!("{c}</w>")
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
        .collect();
    let mut merges = Vec::new();
    loop {
        let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for w in &segmented {
            for pair in w.windows(2) {
                *counts
                    .entry((pair[0].clone(), pair[1].clone()))
                    .or_default() += 1;
            }
        }
        // BTreeMap order breaks ties by text; max_by_key keeps the last maximum, so reverse.
        let Some((best, _)) = counts.into_iter().rev().max_by_key(|(_, n)| *n) else {
            break;
        };
        for w in &mut segmented {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == best.0 && w[i + 1] == best.1 {
                    let right = w.remove(i + 1);
                    w[i].push_str(&right);
                }
                i += 1;
            }
        }
        merges.push(best);
    }
    merges
}

/// Writes a CLIP tokenizer folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`,
/// `special_tokens_map.json`) whose vocabulary is CLIP's 512 byte symbols (bare and with `</w>`),
/// one token per word of `words` (ASCII words), and the start / end tokens; returns the
/// vocabulary size. transformers' `CLIPTokenizer` and [`ClipTokenizer`] read it.
pub fn write_word_tokenizer(dir: &Path, words: &[&str], max_length: usize) -> Result<usize> {
    let symbols = byte_symbols();
    let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
    let merges = learn_word_merges(words);
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i.into()))
        .collect();
    crate::io::write_json(&dir.join("vocab.json"), &serde_json::Value::Object(map))?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    crate::io::write_atomic(&dir.join("merges.txt"), text.as_bytes())?;
    crate::io::write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
            "model_max_length": max_length,
        }),
    )?;
    crate::io::write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::json!({
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        }),
    )?;
    Ok(vocab.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_tokenizer_gives_one_token_per_word_and_spells_out_unknown_words() {
        let dir = std::env::temp_dir().join(format!("fewstep-word-tok-{}", std::process::id()));
        let words = crate::data::captions::vocabulary();
        let size = write_word_tokenizer(&dir, &words, 32).unwrap();
        let tok = ClipTokenizer::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tok.max_length(), 32);
        assert_eq!(tok.eos as usize, size - 1);
        for w in &words {
            let ids = tok.encode(w).unwrap();
            assert_eq!(ids[0], tok.bos);
            assert_eq!(ids[2], tok.eos, "{w} is not one token: {:?}", &ids[..4]);
        }
        let ids = tok.encode("a red circle, two blue squares").unwrap();
        assert_eq!(ids.iter().position(|&i| i == tok.eos), Some(8));
        // An unknown word falls back to byte symbols, not to the unknown (end) token.
        let ids = tok.encode("zebra").unwrap();
        assert!(
            ids.iter().position(|&i| i == tok.eos).unwrap() >= 3,
            "{:?}",
            &ids[..6]
        );
    }
}
