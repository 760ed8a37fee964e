//! SFT data preparation: render chat templates, tokenize once, build loss masks, pack, write arrays.
//!
//! - [`template`]: Hugging Face Jinja chat templates on minijinja, with transformers' semantics, and the
//!   named formats (ChatML, Llama-2, Llama-3, Mistral, Alpaca).
//! - [`tokenize`]: tokenizer.json through the tokenizers crate, with byte offsets.
//! - [`mask`]: loss masks from assistant spans.
//! - [`encode`]: one row (conversation, prompt/completion, text) to ids + mask.
//! - [`pack`]: best-fit-decreasing packing.
//! - [`format`]: the prepared-dataset arrays (.npy, memory-mappable).
//! - [`prepare`]: the streaming, parallel pipeline over JSON Lines files or rows.

pub mod encode;
pub mod format;
pub mod mask;
pub mod pack;
pub mod prepare;
pub mod template;
pub mod tokenize;

pub use encode::{Encoder, Example, TrainOn};
pub use prepare::{prepare, PrepareOptions, PrepareStats, Source, Truncation, DEFAULT_MAX_LINE_BYTES};
pub use template::{named_template, ChatTemplate, Rendered, TEMPLATE_NAMES};
pub use tokenize::{Encoded, TextTokenizer};
