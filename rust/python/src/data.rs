//! Bindings of nibblora_core::data: a `DataPipeline` (template + tokenizer + policies) that renders, encodes
//! and prepares whole datasets with the GIL released.

use std::path::PathBuf;

use nibblora_core::data::{
    prepare, ChatTemplate, Encoder, PrepareOptions, PrepareStats, Source, TextTokenizer, TrainOn, Truncation,
    DEFAULT_MAX_LINE_BYTES,
};
use nibblora_core::Error;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{to_py_err, Area, TrainOnArg, TruncationArg};

/// (input_ids uint32[n], loss_mask uint8[n])
type EncodedArrays<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u8>>);

// The text signature above spells the default out for Python's inspect (and stubtest).
const _: () = assert!(DEFAULT_MAX_LINE_BYTES == 8388608);

fn data_err(phase: &str, err: Error) -> PyErr {
    to_py_err(Area::Data, phase, err)
}

/// DataPipeline(tokenizer_path, template_source, variables, train_on, content_specials_as_text, eos_token)
#[pyclass(frozen, module = "nibblora._native")]
struct DataPipeline {
    encoder: Encoder,
}

fn char_offset(text: &str, byte: usize) -> usize {
    text[..byte].chars().count()
}

fn stats_dict<'py>(py: Python<'py>, stats: &PrepareStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rows_in", stats.rows_in)?;
    d.set_item("documents", stats.documents)?;
    d.set_item("rows_out", stats.rows_out)?;
    d.set_item("tokens", stats.tokens)?;
    d.set_item("supervised_tokens", stats.supervised_tokens)?;
    d.set_item("truncated", stats.truncated)?;
    d.set_item("dropped_too_long", stats.dropped_too_long)?;
    d.set_item("dropped_no_supervised", stats.dropped_no_supervised)?;
    d.set_item("skipped_bad_lines", stats.skipped_bad_lines)?;
    d.set_item("bytes_read", stats.bytes_read)?;
    Ok(d)
}

#[pymethods]
impl DataPipeline {
    #[new]
    #[pyo3(signature = (tokenizer_path, template_source, variables, train_on=TrainOnArg(TrainOn::Assistant), content_specials_as_text=true, eos_token=None))]
    #[pyo3(
        text_signature = "(tokenizer_path, template_source, variables, train_on='assistant', content_specials_as_text=True, eos_token=None)"
    )]
    fn new(
        py: Python<'_>,
        tokenizer_path: PathBuf,
        template_source: Option<String>,
        variables: Vec<(String, String)>,
        train_on: TrainOnArg,
        content_specials_as_text: bool,
        eos_token: Option<String>,
    ) -> PyResult<Self> {
        let train_on = train_on.0;
        let tokenizer = py
            .allow_threads(|| TextTokenizer::from_file(&tokenizer_path))
            .map_err(|e| data_err("loading the tokenizer", e))?;
        let template = template_source
            .map(|source| ChatTemplate::new(&source, variables))
            .transpose()
            .map_err(|e| data_err("compiling the chat template", e))?;
        let encoder =
            Encoder::new(template, tokenizer, train_on, content_specials_as_text, eos_token.as_deref());
        Ok(DataPipeline { encoder })
    }

    /// render(messages_json, add_generation_prompt=False) -> (text, spans): the assistant spans the loss
    /// looks at, as (start, end) character offsets (generation tags, or role spans without them).
    #[pyo3(signature = (messages_json, add_generation_prompt=false))]
    fn render(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
    ) -> PyResult<(String, Vec<(usize, usize)>)> {
        let messages: serde_json::Value = serde_json::from_str(messages_json).map_err(|e| {
            data_err("reading messages", Error::Input { location: String::new(), message: e.to_string() })
        })?;
        if add_generation_prompt {
            // A prompt for generation: the plain render, no spans.
            let rendered = self
                .encoder
                .render_plain(&messages, true)
                .map_err(|e| data_err("rendering the chat template", e))?;
            return Ok((rendered, vec![]));
        }
        let (rendered, spans) = self
            .encoder
            .render_with_spans(&messages)
            .map_err(|e| data_err("rendering the chat template", e))?;
        let spans = spans
            .iter()
            .map(|s| (char_offset(&rendered.text, s.start), char_offset(&rendered.text, s.end)))
            .collect();
        Ok((rendered.text, spans))
    }

    /// encode(row_json) -> (input_ids uint32[n], loss_mask uint8[n]) for one row.
    fn encode<'py>(&self, py: Python<'py>, row_json: &str) -> PyResult<EncodedArrays<'py>> {
        let row: serde_json::Value = serde_json::from_str(row_json).map_err(|e| {
            data_err("reading the row", Error::Input { location: String::new(), message: e.to_string() })
        })?;
        let example = py
            .allow_threads(|| self.encoder.encode_row(&row))
            .map_err(|e| data_err("encoding the row", e))?;
        Ok((PyArray1::from_vec(py, example.ids), PyArray1::from_vec(py, example.mask)))
    }

    /// tokenize(text, add_special_tokens=False) -> list of ids, as the tokenizers package would.
    #[pyo3(signature = (text, add_special_tokens=false))]
    fn tokenize(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        Ok(self
            .encoder
            .tokenizer()
            .encode(text, add_special_tokens)
            .map_err(|e| data_err("tokenizing", e))?
            .ids)
    }

    /// prepare(sources, out_dir, ..., progress=None) -> stats dict. `sources` is a list of ("jsonl", path) or
    /// ("rows", name, [json strings]); any other kind is a DataError. Rows longer than `max_line_bytes` stop
    /// the run with a DataError naming file:line. Runs with the GIL released; `progress(stats)` is called
    /// after every batch (Ctrl-C is checked there).
    #[pyo3(signature = (sources, out_dir, max_length=None, truncation=TruncationArg(Truncation::KeepStart), pack=false, shard=(0, 1), skip_bad_lines=false, batch_rows=2048, progress=None, max_line_bytes=DEFAULT_MAX_LINE_BYTES))]
    #[pyo3(
        text_signature = "($self, sources, out_dir, max_length=None, truncation='keep-start', pack=False, shard=..., skip_bad_lines=False, batch_rows=2048, progress=None, max_line_bytes=8388608)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn prepare<'py>(
        &self,
        py: Python<'py>,
        sources: Vec<Bound<'py, PyAny>>,
        out_dir: PathBuf,
        max_length: Option<usize>,
        truncation: TruncationArg,
        pack: bool,
        shard: (usize, usize),
        skip_bad_lines: bool,
        batch_rows: usize,
        progress: Option<PyObject>,
        max_line_bytes: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let truncation = truncation.0;
        let mut owned = Vec::with_capacity(sources.len());
        for source in sources {
            let kind: String = source.get_item(0)?.extract()?;
            owned.push(match kind.as_str() {
                "jsonl" => Source::JsonLines(source.get_item(1)?.extract()?),
                "rows" => Source::Rows {
                    name: source.get_item(1)?.extract()?,
                    rows: source.get_item(2)?.extract()?,
                },
                other => {
                    return Err(data_err(
                        "preparing the dataset",
                        Error::InvalidArgument(format!(
                        "source kind {other:?} is not known: use (\"jsonl\", path) or (\"rows\", name, rows)"
                    )),
                    ))
                }
            });
        }
        let options = PrepareOptions {
            max_length,
            truncation,
            pack,
            shard,
            skip_bad_lines,
            batch_rows: batch_rows.max(1),
            max_line_bytes,
        };
        let mut callback_error: Option<PyErr> = None;
        let result = py.allow_threads(|| {
            let mut report = |stats: &PrepareStats| -> nibblora_core::Result<()> {
                Python::with_gil(|py| {
                    let outcome = py.check_signals().and_then(|_| match &progress {
                        Some(cb) => cb.call1(py, (stats_dict(py, stats)?,)).map(|_| ()),
                        None => Ok(()),
                    });
                    outcome.map_err(|err| {
                        callback_error = Some(err);
                        Error::Interrupted
                    })
                })
            };
            prepare(&self.encoder, &owned, &options, &out_dir, &mut report)
        });
        if let Some(err) = callback_error {
            return Err(err);
        }
        let stats = result.map_err(|e| data_err("preparing the dataset", e))?;
        stats_dict(py, &stats)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPipeline>()?;
    m.add_function(wrap_pyfunction!(named_template_source, m)?)?;
    m.add("TEMPLATE_NAMES", nibblora_core::data::TEMPLATE_NAMES.to_vec())?;
    Ok(())
}

/// named_template_source(name) -> the Jinja source of a named format, or None.
#[pyfunction]
fn named_template_source(name: &str) -> Option<&'static str> {
    nibblora_core::data::named_template(name)
}
