//! The prepared-dataset folder: 1-D `.npy` arrays written as a stream, so numpy can memory-map them.
//!
//! | file | dtype | shape |
//! | --- | --- | --- |
//! | `input_ids.npy` | uint32 | all tokens, row after row |
//! | `loss_mask.npy` | uint8 | one per token: 1 where the loss looks (labels = ids there, -100 elsewhere) |
//! | `row_offsets.npy` | uint64 | rows + 1: row `i` is tokens `[row_offsets[i], row_offsets[i+1])` |
//! | `doc_offsets.npy` | uint64 | packed only, documents + 1: document boundaries in the token stream |
//!
//! The header is written with room for any length first and rewritten with the final shape at the end.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Bytes before the data of every array we write (a multiple of 64, as the .npy format asks).
pub const NPY_HEADER_LEN: usize = 128;

pub const INPUT_IDS: &str = "input_ids.npy";
pub const LOSS_MASK: &str = "loss_mask.npy";
pub const ROW_OFFSETS: &str = "row_offsets.npy";
pub const DOC_OFFSETS: &str = "doc_offsets.npy";

/// Element types of the arrays.
pub trait NpyElement: Copy {
    const DESCR: &'static str;
    fn put(self, out: &mut Vec<u8>);
}
impl NpyElement for u8 {
    const DESCR: &'static str = "|u1";
    fn put(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}
impl NpyElement for u32 {
    const DESCR: &'static str = "<u4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElement for u64 {
    const DESCR: &'static str = "<u8";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// A 1-D .npy file written element by element.
pub struct NpyWriter<T: NpyElement> {
    file: BufWriter<File>,
    path: PathBuf,
    len: u64,
    scratch: Vec<u8>,
    _marker: std::marker::PhantomData<T>,
}

fn npy_header(descr: &str, len: u64) -> Vec<u8> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({len},), }}");
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&((NPY_HEADER_LEN - 10) as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.resize(NPY_HEADER_LEN - 1, b' ');
    header.push(b'\n');
    header
}

impl<T: NpyElement> NpyWriter<T> {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::write(path, &e))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&npy_header(T::DESCR, 0)).map_err(|e| Error::write(path, &e))?;
        Ok(NpyWriter { file, path: path.to_path_buf(), len: 0, scratch: vec![], _marker: Default::default() })
    }

    pub fn extend(&mut self, values: &[T]) -> Result<()> {
        self.scratch.clear();
        for &v in values {
            v.put(&mut self.scratch);
        }
        self.file.write_all(&self.scratch).map_err(|e| Error::write(&self.path, &e))?;
        self.len += values.len() as u64;
        Ok(())
    }

    pub fn push(&mut self, value: T) -> Result<()> {
        self.extend(&[value])
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write the final shape into the header and flush.
    pub fn finish(mut self) -> Result<()> {
        let path = self.path.clone();
        let io = |e: std::io::Error| Error::write(&path, &e);
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        self.file.write_all(&npy_header(T::DESCR, self.len)).map_err(io)?;
        self.file.flush().map_err(io)?;
        Ok(())
    }
}

/// A read-only memory map of a 1-D .npy array this module wrote.
pub struct NpyMap {
    map: memmap2::Mmap,
}

impl NpyMap {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, &e))?;
        // SAFETY: the file is ours, in a private temporary folder, and nothing writes it while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, &e))?;
        if map.len() < NPY_HEADER_LEN {
            return Err(Error::InvalidArgument(format!("{}: truncated array file", path.display())));
        }
        Ok(NpyMap { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[NPY_HEADER_LEN..]
    }
}

/// Writes a prepared dataset's arrays: one call per document or packed row.
pub struct DatasetWriter {
    ids: NpyWriter<u32>,
    mask: NpyWriter<u8>,
    row_offsets: NpyWriter<u64>,
    doc_offsets: Option<NpyWriter<u64>>,
}

impl DatasetWriter {
    /// Create the arrays in `dir`; `packed` adds doc_offsets.npy.
    pub fn create(dir: &Path, packed: bool, prefix: &str) -> Result<Self> {
        let at = |name: &str| dir.join(format!("{prefix}{name}"));
        let mut row_offsets = NpyWriter::create(&at(ROW_OFFSETS))?;
        row_offsets.push(0)?;
        let doc_offsets = if packed {
            let mut w = NpyWriter::create(&at(DOC_OFFSETS))?;
            w.push(0)?;
            Some(w)
        } else {
            None
        };
        Ok(DatasetWriter {
            ids: NpyWriter::create(&at(INPUT_IDS))?,
            mask: NpyWriter::create(&at(LOSS_MASK))?,
            row_offsets,
            doc_offsets,
        })
    }

    /// Append one document to the current row (packed) or as its own row (call `end_row` after).
    pub fn push_document(&mut self, ids: &[u32], mask: &[u8]) -> Result<()> {
        self.ids.extend(ids)?;
        self.mask.extend(mask)?;
        if let Some(docs) = &mut self.doc_offsets {
            docs.push(self.ids.len())?;
        }
        Ok(())
    }

    pub fn end_row(&mut self) -> Result<()> {
        self.row_offsets.push(self.ids.len())
    }

    pub fn tokens(&self) -> u64 {
        self.ids.len()
    }

    pub fn finish(self) -> Result<()> {
        self.ids.finish()?;
        self.mask.finish()?;
        self.row_offsets.finish()?;
        if let Some(docs) = self.doc_offsets {
            docs.finish()?;
        }
        Ok(())
    }
}
