//! Tokenization with Hugging Face's tokenizers crate, from a tokenizer.json.
//!
//! A rendered conversation is tokenized in one call with byte offsets (add_special_tokens=False: BOS/EOS come
//! only from the template). When message content held special-token strings (`<|im_end|>` typed by a user),
//! the text is cut at the template's own special tokens and the pieces between them are tokenized with
//! special-token matching off, so the user's copy is plain text.

use std::ops::Range;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Token ids of one text and the byte range each token covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// A loaded tokenizer.json.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer with special-token matching off (content pieces are plain text).
    plain: Tokenizer,
    /// Strings of the special added tokens with their ids, longest first.
    specials: Vec<(String, u32)>,
}

impl TextTokenizer {
    /// Load a tokenizer.json file.
    pub fn from_file(path: &Path) -> Result<TextTokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, &e))?;
        Self::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: not a usable tokenizer.json ({e})", path.display())))
    }

    /// Load a tokenizer from the bytes of a tokenizer.json.
    pub fn from_bytes(bytes: &[u8]) -> Result<TextTokenizer> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(TextTokenizer { inner, plain, specials })
    }

    /// Special-token strings (longest first).
    pub fn special_strings(&self) -> impl Iterator<Item = &str> {
        self.specials.iter().map(|(s, _)| s.as_str())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokenize `text` as the tokenizers package does with `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("tokenizing failed: {e}")))?;
        Ok(Encoded { ids: encoding.get_ids().to_vec(), offsets: encoding.get_offsets().to_vec() })
    }

    /// Tokenize a rendered conversation (no special tokens added); `plain_spans` are byte ranges of
    /// special-token strings that came from message content and must be tokenized as plain text.
    pub fn encode_rendered(&self, text: &str, plain_spans: &[Range<usize>]) -> Result<Encoded> {
        if plain_spans.is_empty() {
            return self.encode(text, false);
        }
        let mut cuts: Vec<(usize, usize, u32)> = vec![];
        for (special, id) in &self.specials {
            for (at, _) in text.match_indices(special.as_str()) {
                let end = at + special.len();
                if !plain_spans.iter().any(|s| at < s.end && end > s.start) {
                    cuts.push((at, end, *id));
                }
            }
        }
        cuts.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut out = Encoded::default();
        let mut cursor = 0usize;
        for (start, end, id) in cuts {
            if start < cursor {
                continue; // overlaps a longer special token already taken
            }
            self.encode_plain_piece(text, cursor..start, &mut out)?;
            out.ids.push(id);
            out.offsets.push((start, end));
            cursor = end;
        }
        self.encode_plain_piece(text, cursor..text.len(), &mut out)?;
        Ok(out)
    }

    fn encode_plain_piece(&self, text: &str, range: Range<usize>, out: &mut Encoded) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let encoding = self
            .plain
            .encode(&text[range.clone()], false)
            .map_err(|e| Error::Tokenizer(format!("tokenizing failed: {e}")))?;
        out.ids.extend_from_slice(encoding.get_ids());
        out.offsets.extend(encoding.get_offsets().iter().map(|&(s, e)| (s + range.start, e + range.start)));
        Ok(())
    }
}
