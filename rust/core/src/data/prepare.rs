//! The whole preparation: read rows, encode them in parallel, truncate, drop, pack, write.
//!
//! Rows stream through in batches (read a batch, encode it on all threads, write it in order), so memory holds
//! one batch however large the dataset. Packing needs every document's length first: documents are written
//! unpacked to scratch arrays, packed by length, then copied row by row out of a memory map.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::encode::{Encoder, Example};
use super::format::{DatasetWriter, NpyMap, INPUT_IDS, LOSS_MASK, ROW_OFFSETS};
use super::pack::best_fit_decreasing;
use crate::error::{Error, Result};

/// What to do with a document longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the first `max_length` tokens.
    KeepStart,
    /// Drop the row (counted).
    Drop,
    /// Stop with an error naming the row.
    Error,
}

impl Truncation {
    pub fn from_name(name: &str) -> Result<Truncation> {
        match name {
            "keep-start" | "keep_start" => Ok(Truncation::KeepStart),
            "drop" => Ok(Truncation::Drop),
            "error" => Ok(Truncation::Error),
            other => Err(Error::InvalidArgument(format!(
                "truncation policy {other:?} is not known: use keep-start, drop or error"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    pub pack: bool,
    /// (index, count): keep rows whose global position `p` has `p % count == index`.
    pub shard: (usize, usize),
    /// Skip (and count) malformed JSON lines instead of stopping.
    pub skip_bad_lines: bool,
    /// Rows encoded per parallel batch.
    pub batch_rows: usize,
    /// Longest accepted row, in bytes of JSON (a line of a JSON Lines file, or one row handed in). Longer
    /// rows stop the run with an error naming file:line: rendering and tokenizing a row takes a couple of
    /// hundred times its size in memory, so one stray huge line could otherwise exhaust it.
    pub max_line_bytes: usize,
}

/// Default of [`PrepareOptions::max_line_bytes`]: 8 MiB, a few million tokens, far past any context length.
pub const DEFAULT_MAX_LINE_BYTES: usize = 8 << 20;

/// A batch stops growing once its rows hold this many bytes, so memory stays bounded however rows are sized.
const BATCH_BYTES: usize = 64 << 20;

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            max_length: None,
            truncation: Truncation::KeepStart,
            pack: false,
            shard: (0, 1),
            skip_bad_lines: false,
            batch_rows: 2048,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// Where rows come from.
pub enum Source {
    /// A JSON Lines file (one object per line; blank lines are ignored).
    JsonLines(PathBuf),
    /// Rows already serialized as JSON, one object each; `name` is used in error messages.
    Rows { name: String, rows: Vec<String> },
}

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrepareStats {
    /// Rows read in this shard (blank lines and other shards' rows excluded).
    pub rows_in: u64,
    /// Documents kept.
    pub documents: u64,
    /// Rows in the output (documents, or packed rows).
    pub rows_out: u64,
    pub tokens: u64,
    pub supervised_tokens: u64,
    pub truncated: u64,
    pub dropped_too_long: u64,
    pub dropped_no_supervised: u64,
    pub skipped_bad_lines: u64,
    /// Input bytes consumed so far (JSON Lines sources), for progress.
    pub bytes_read: u64,
}

/// Prepare `sources` into `out_dir` (which must exist). `progress` is called after every batch; returning
/// an error (e.g. [`Error::Interrupted`]) stops the run.
pub fn prepare(
    encoder: &Encoder,
    sources: &[Source],
    options: &PrepareOptions,
    out_dir: &Path,
    progress: &mut dyn FnMut(&PrepareStats) -> Result<()>,
) -> Result<PrepareStats> {
    let (index, count) = options.shard;
    if count == 0 || index >= count {
        return Err(Error::InvalidArgument(format!("shard {index}/{count}: use i/n with 0 <= i < n")));
    }
    if options.max_length == Some(0) {
        return Err(Error::InvalidArgument("max length must be positive".into()));
    }
    if options.pack && options.max_length.is_none() {
        return Err(Error::InvalidArgument("packing needs a max length (the row size)".into()));
    }
    if options.max_line_bytes == 0 {
        return Err(Error::InvalidArgument("max line bytes must be positive".into()));
    }
    let scratch = if options.pack { "_unpacked_" } else { "" };
    let mut writer = DatasetWriter::create(out_dir, false, scratch)?;
    let mut stats = PrepareStats::default();
    let mut lengths: Vec<u32> = vec![];
    let mut position = 0u64; // global row position across sources, for sharding
    for source in sources {
        let mut reader = RowReader::open(source)?;
        loop {
            let batch =
                reader.next_batch(options.batch_rows, options.max_line_bytes, &mut stats.bytes_read)?;
            if batch.is_empty() {
                break;
            }
            let mine: Vec<(String, String)> = batch
                .into_iter()
                .filter(|_| {
                    let keep = position % count as u64 == index as u64;
                    position += 1;
                    keep
                })
                .collect();
            let encoded: Vec<Result<Example>> =
                mine.par_iter().map(|(location, line)| encode_line(encoder, location, line)).collect();
            for ((location, _), result) in mine.iter().zip(encoded) {
                stats.rows_in += 1;
                let example = match result {
                    Ok(example) => example,
                    Err(Error::Input { message, .. })
                        if options.skip_bad_lines && message.starts_with(BAD_JSON) =>
                    {
                        stats.skipped_bad_lines += 1;
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                if let Some(example) = limit_length(example, location, options, &mut stats)? {
                    writer.push_document(&example.ids, &example.mask)?;
                    writer.end_row()?;
                    lengths.push(example.ids.len() as u32);
                    stats.documents += 1;
                    stats.tokens += example.ids.len() as u64;
                    stats.supervised_tokens += example.supervised() as u64;
                }
            }
            progress(&stats)?;
        }
    }
    writer.finish()?;
    if !options.pack {
        stats.rows_out = stats.documents;
        return Ok(stats);
    }
    let capacity = options.max_length.unwrap_or(usize::MAX) as u32;
    let rows = best_fit_decreasing(&lengths, capacity);
    stats.rows_out = rows.len() as u64;
    write_packed(out_dir, scratch, &rows)?;
    progress(&stats)?;
    Ok(stats)
}

const BAD_JSON: &str = "malformed JSON";

fn encode_line(encoder: &Encoder, location: &str, line: &str) -> Result<Example> {
    let row: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Input {
        location: location.to_string(),
        message: format!(
            "{BAD_JSON} ({e}); fix the line or pass --skip-bad-lines to skip and count such lines"
        ),
    })?;
    encoder.encode_row(&row).map_err(|e| match e {
        Error::Input { message, .. } => Error::Input { location: location.to_string(), message },
        Error::Template(message) | Error::Tokenizer(message) => {
            Error::Input { location: location.to_string(), message }
        }
        other => other,
    })
}

/// Apply the length policy; `None` when the row is dropped.
fn limit_length(
    mut example: Example,
    location: &str,
    options: &PrepareOptions,
    stats: &mut PrepareStats,
) -> Result<Option<Example>> {
    if let Some(max) = options.max_length {
        if example.ids.len() > max {
            match options.truncation {
                Truncation::KeepStart => {
                    example.ids.truncate(max);
                    example.mask.truncate(max);
                    stats.truncated += 1;
                }
                Truncation::Drop => {
                    stats.dropped_too_long += 1;
                    return Ok(None);
                }
                Truncation::Error => {
                    return Err(Error::Input {
                        location: location.to_string(),
                        message: format!(
                            "row has {} tokens, more than the max length {max}; raise --max-length or choose \
                             --truncation keep-start or drop",
                            example.ids.len()
                        ),
                    })
                }
            }
        }
    }
    if example.supervised() == 0 {
        stats.dropped_no_supervised += 1;
        return Ok(None);
    }
    Ok(Some(example))
}

/// Copy documents from the scratch arrays into packed rows, then delete the scratch arrays.
fn write_packed(out_dir: &Path, scratch: &str, rows: &[Vec<u32>]) -> Result<()> {
    let at = |name: &str| out_dir.join(format!("{scratch}{name}"));
    {
        let ids = NpyMap::open(&at(INPUT_IDS))?;
        let mask = NpyMap::open(&at(LOSS_MASK))?;
        let offsets = NpyMap::open(&at(ROW_OFFSETS))?;
        let offset = |doc: usize| -> usize {
            let b = &offsets.bytes()[doc * 8..doc * 8 + 8];
            u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize
        };
        let mut writer = DatasetWriter::create(out_dir, true, "")?;
        let mut doc_ids: Vec<u32> = vec![];
        for row in rows {
            for &doc in row {
                let (start, end) = (offset(doc as usize), offset(doc as usize + 1));
                doc_ids.clear();
                doc_ids.extend(
                    ids.bytes()[start * 4..end * 4]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                writer.push_document(&doc_ids, &mask.bytes()[start..end])?;
            }
            writer.end_row()?;
        }
        writer.finish()?;
    }
    for name in [INPUT_IDS, LOSS_MASK, ROW_OFFSETS] {
        std::fs::remove_file(at(name)).map_err(|e| Error::write(&at(name), &e))?;
    }
    Ok(())
}

/// Reads rows as (location, JSON text) in batches.
enum RowReader<'a> {
    File { path: PathBuf, reader: BufReader<File>, line: u64 },
    Rows { name: &'a str, rows: &'a [String], next: usize },
}

impl<'a> RowReader<'a> {
    fn open(source: &'a Source) -> Result<RowReader<'a>> {
        Ok(match source {
            Source::JsonLines(path) => {
                let file = File::open(path).map_err(|e| Error::io(path, &e))?;
                if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                    return Err(Error::Io {
                        path: path.display().to_string(),
                        message: "is a folder, expected a JSON Lines file".into(),
                        not_found: false,
                    });
                }
                RowReader::File {
                    path: path.clone(),
                    reader: BufReader::with_capacity(1 << 20, file),
                    line: 0,
                }
            }
            Source::Rows { name, rows } => RowReader::Rows { name, rows, next: 0 },
        })
    }

    fn next_batch(
        &mut self,
        size: usize,
        max_line: usize,
        bytes_read: &mut u64,
    ) -> Result<Vec<(String, String)>> {
        let mut batch = Vec::with_capacity(size.min(4096));
        let mut batch_bytes = 0usize;
        match self {
            RowReader::File { path, reader, line } => {
                let mut buf = Vec::new();
                while batch.len() < size && batch_bytes < BATCH_BYTES {
                    buf.clear();
                    let (n, line_len) =
                        read_line_capped(reader, &mut buf, max_line).map_err(|e| Error::io(path, &e))?;
                    if n == 0 {
                        break;
                    }
                    *line += 1;
                    *bytes_read += n as u64;
                    let location = format!("{}:{}", path.display(), line);
                    if line_len > max_line {
                        return Err(too_long(location, line_len, max_line));
                    }
                    let text = String::from_utf8(std::mem::take(&mut buf)).map_err(|_| Error::Input {
                        location: location.clone(),
                        message: "not valid UTF-8".into(),
                    })?;
                    if text.trim().is_empty() {
                        continue;
                    }
                    batch_bytes += text.len();
                    batch.push((location, text));
                }
            }
            RowReader::Rows { name, rows, next } => {
                while *next < rows.len() && batch.len() < size && batch_bytes < BATCH_BYTES {
                    let (i, row) = (*next, &rows[*next]);
                    *next += 1;
                    if row.len() > max_line {
                        return Err(too_long(format!("{name} row {i}"), row.len(), max_line));
                    }
                    batch_bytes += row.len();
                    batch.push((format!("{name} row {i}"), row.clone()));
                }
            }
        }
        Ok(batch)
    }
}

fn too_long(location: String, len: usize, max_line: usize) -> Error {
    Error::Input {
        location,
        message: format!(
            "the row is {len} bytes, over the {max_line}-byte limit for one row; split it, or raise the limit \
             with --max-line-bytes if it is meant to be this long"
        ),
    }
}

/// Read one line (through its '\n') into `buf`, keeping at most `max_line` bytes of it: a longer line is
/// consumed without being stored. Returns (bytes consumed, length of the line without its line ending).
fn read_line_capped(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max_line: usize,
) -> std::io::Result<(usize, usize)> {
    let mut consumed = 0usize;
    let mut line_len = 0usize;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        line_len += take - usize::from(done);
        if line_len <= max_line {
            buf.extend_from_slice(&chunk[..take]);
        } else if !buf.is_empty() {
            *buf = Vec::new(); // give the memory back: the line is refused
        }
        reader.consume(take);
        consumed += take;
        if done {
            break;
        }
    }
    Ok((consumed, line_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reads_keep_short_lines_and_measure_long_ones_without_storing_them() {
        let text = b"short\n0123456789\nlast";
        let mut reader = std::io::BufReader::with_capacity(4, &text[..]);
        let mut buf = vec![];
        assert_eq!(read_line_capped(&mut reader, &mut buf, 8).unwrap(), (6, 5));
        assert_eq!(buf, b"short\n");
        buf.clear();
        assert_eq!(read_line_capped(&mut reader, &mut buf, 8).unwrap(), (11, 10));
        assert!(buf.is_empty(), "an over-long line is not kept");
        buf.clear();
        assert_eq!(read_line_capped(&mut reader, &mut buf, 8).unwrap(), (4, 4));
        assert_eq!(buf, b"last");
        buf.clear();
        assert_eq!(read_line_capped(&mut reader, &mut buf, 8).unwrap(), (0, 0));
    }

    #[test]
    fn too_long_message_names_the_place_and_the_option() {
        let err = too_long("data.jsonl:7".into(), 100, 10).to_string();
        assert!(err.starts_with("data.jsonl:7: the row is 100 bytes, over the 10-byte limit"), "{err}");
        assert!(err.contains("--max-line-bytes"), "{err}");
    }
}
