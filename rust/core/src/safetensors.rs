//! Reading safetensors files that nobody vouched for.
//!
//! Layout: a u64 little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [begin,
//! end]}, "__metadata__": {str: str}}`, then the data buffer. Every claim the header makes is checked before a
//! single data byte is touched: the header length against the file size and a 100 MB cap, the JSON shape of
//! every entry, dtype names, shape products and byte sizes (overflow-checked), and that the entries tile the
//! data buffer exactly (no gap, no overlap, nothing past the end of the file). Only then is the file
//! memory-mapped, and a tensor's bytes are handed out as a slice that provably lies inside the mapping.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Header lengths above this are refused before allocating anything (safetensors uses the same cap).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Element types safetensors names, with their widths in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    pub fn from_name(name: &str) -> Option<Dtype> {
        Some(match name {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }
}

/// One tensor of a checked header. `begin..end` is relative to the start of the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A checked header: tensors in data order, the metadata, and where the data buffer starts in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub tensors: Vec<TensorInfo>,
    pub metadata: Vec<(String, String)>,
    pub data_start: usize,
}

/// The header length a file's first 8 bytes claim, checked against the file's length and the cap.
pub fn check_header_len(prefix: [u8; 8], file_len: u64) -> std::result::Result<usize, String> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or not a safetensors file)"
        ));
    }
    if n > file_len.saturating_sub(8) {
        return Err(format!("truncated: header claims {n} bytes but the file has only {file_len} bytes"));
    }
    Ok(n as usize)
}

/// Parse and check header JSON whose data buffer holds `data_len` bytes.
pub fn parse_header(json: &[u8], data_len: u64) -> std::result::Result<(Vec<TensorInfo>, Vec<(String, String)>), String> {
    let map: Map<String, Value> =
        serde_json::from_slice(json).map_err(|e| format!("header is not a JSON object ({e})"))?;
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(map.len());
    for (name, entry) in map {
        if name == "__metadata__" {
            let obj = entry.as_object().ok_or("__metadata__ is not an object")?;
            for (k, v) in obj {
                let v = v.as_str().ok_or_else(|| format!("__metadata__[{k:?}] is not a string"))?;
                metadata.push((k.clone(), v.to_string()));
            }
            continue;
        }
        tensors.push(parse_entry(&name, &entry)?);
    }
    // The data buffer must be tiled exactly: each tensor starts where the previous one ended.
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut cursor = 0usize;
    for t in &tensors {
        if t.begin != cursor {
            let what = if t.begin < cursor { "overlaps the tensor before it" } else { "leaves a gap before it" };
            return Err(format!("tensor {:?} (data_offsets [{}, {}]) {what}", t.name, t.begin, t.end));
        }
        cursor = t.end;
    }
    if cursor as u64 != data_len {
        return Err(if (cursor as u64) > data_len {
            format!("truncated: the header needs {cursor} data bytes but the file holds {data_len}")
        } else {
            format!("{} bytes after the last tensor that no header entry covers", data_len - cursor as u64)
        });
    }
    Ok((tensors, metadata))
}

fn parse_entry(name: &str, entry: &Value) -> std::result::Result<TensorInfo, String> {
    let bad = |what: &str| format!("tensor {name:?}: {what}");
    let obj = entry.as_object().ok_or_else(|| bad("entry is not an object"))?;
    let dtype_name = obj.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("no dtype string"))?;
    let dtype = Dtype::from_name(dtype_name).ok_or_else(|| bad(&format!("unknown dtype {dtype_name:?}")))?;
    let dims = obj.get("shape").and_then(Value::as_array).ok_or_else(|| bad("no shape list"))?;
    let mut shape = Vec::with_capacity(dims.len());
    let mut numel: usize = 1;
    for d in dims {
        let d = d.as_u64().ok_or_else(|| bad("shape holds something other than a non-negative integer"))?;
        let d = usize::try_from(d).map_err(|_| bad("dimension too large"))?;
        numel = numel.checked_mul(d).ok_or_else(|| bad("shape product overflows"))?;
        shape.push(d);
    }
    let nbytes = numel.checked_mul(dtype.size()).ok_or_else(|| bad("byte size overflows"))?;
    let offsets = obj.get("data_offsets").and_then(Value::as_array).ok_or_else(|| bad("no data_offsets"))?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (
            b.as_u64().and_then(|v| usize::try_from(v).ok()),
            e.as_u64().and_then(|v| usize::try_from(v).ok()),
        ),
        _ => (None, None),
    };
    let (begin, end) = match (begin, end) {
        (Some(b), Some(e)) if b <= e => (b, e),
        _ => return Err(bad("data_offsets must be two non-negative integers [begin, end] with begin <= end")),
    };
    if end - begin != nbytes {
        return Err(bad(&format!(
            "{dtype_name} {shape:?} needs {nbytes} bytes but data_offsets [{begin}, {end}] span {}",
            end - begin
        )));
    }
    Ok(TensorInfo { name: name.to_string(), dtype, shape, begin, end })
}

/// Parse a whole safetensors file held in memory (tests and the fuzz target use this).
pub fn parse_file_bytes(bytes: &[u8]) -> std::result::Result<Header, String> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| format!("not a safetensors file (only {} bytes)", bytes.len()))?;
    let n = check_header_len(prefix, bytes.len() as u64)?;
    let data_start = 8 + n;
    let (tensors, metadata) = parse_header(&bytes[8..data_start], (bytes.len() - data_start) as u64)?;
    Ok(Header { tensors, metadata, data_start })
}

/// A checked, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    header: Header,
    index: std::collections::HashMap<String, usize>,
    map: Option<memmap2::Mmap>,
}

impl SafetensorsFile {
    /// Open `path`, read and check its header (plain reads), then map the file read-only.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let format = |message: String| Error::Format { path: path.display().to_string(), message };
        let mut file = File::open(path).map_err(|e| Error::io(path, &e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, &e))?.len();
        let mut prefix = [0u8; 8];
        if file_len < 8 {
            return Err(format(format!("not a safetensors file (only {file_len} bytes)")));
        }
        file.read_exact(&mut prefix).map_err(|e| Error::io(path, &e))?;
        let n = check_header_len(prefix, file_len).map_err(format)?;
        let mut json = vec![0u8; n];
        file.read_exact(&mut json).map_err(|e| Error::io(path, &e))?;
        let data_start = 8 + n;
        let (tensors, metadata) = parse_header(&json, file_len - data_start as u64).map_err(format)?;
        let data_end = data_start.checked_add(tensors.last().map_or(0, |t| t.end)).ok_or_else(|| {
            format("data offsets overflow".to_string())
        })?;
        // SAFETY: the mapping is read-only and private. Another process truncating the file while we read it
        // would fault (SIGBUS), which no reader of a mapped file can rule out; the header's claims were
        // checked against the length just read.
        let map = if data_end > data_start {
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, &e))?;
            if (map.len() as u64) < data_end as u64 {
                return Err(format("file shrank while being opened".to_string()));
            }
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Sequential);
            Some(map)
        } else {
            None
        };
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), header: Header { tensors, metadata, data_start }, index, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i]).ok_or_else(|| Error::Format {
            path: self.path.display().to_string(),
            message: format!("no tensor named {name:?}"),
        })
    }

    /// The bytes of a tensor of this file's header (in range by construction).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        match &self.map {
            Some(map) => &map[self.header.data_start + info.begin..self.header.data_start + info.end],
            None => &[],
        }
    }

    /// Tell the kernel we are done with a tensor's pages, so a streaming pass over a large file keeps about
    /// one tensor resident instead of the whole file. The pages are clean file pages: dropping them is free,
    /// and a later read maps them in again.
    pub fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        if let Some(map) = &self.map {
            if info.nbytes() > 0 {
                // SAFETY: the map is a read-only private file mapping; MADV_DONTNEED only drops clean pages,
                // which are read back from the file on the next access, so no slice handed out changes.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        self.header.data_start + info.begin,
                        info.nbytes(),
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A well-formed file: entries (name, dtype, shape) laid out in order, data bytes = index mod 251.
    pub(crate) fn build(entries: &[(&str, &str, Vec<usize>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut cursor = 0usize;
        for (name, dtype, shape) in entries {
            let n = shape.iter().product::<usize>() * Dtype::from_name(dtype).unwrap().size();
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + n]}),
            );
            cursor += n;
        }
        let json = serde_json::to_vec(&Value::Object(header)).unwrap();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend((0..cursor).map(|i| (i % 251) as u8));
        out
    }

    fn with_header(json: &str, data_len: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    #[test]
    fn well_formed_file_parses_in_data_order() {
        let bytes = build(&[("b", "BF16", vec![2, 3]), ("a", "F32", vec![4])]);
        let h = parse_file_bytes(&bytes).unwrap();
        assert_eq!(h.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!((h.tensors[1].begin, h.tensors[1].end), (12, 28));
    }

    #[test]
    fn huge_header_length_is_refused_before_allocating() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = parse_file_bytes(&bytes).unwrap_err();
        assert!(err.contains("exceeds the 104857600-byte limit"), "{err}");
    }

    #[test]
    fn header_longer_than_the_file_is_truncation() {
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(
            parse_file_bytes(&bytes).unwrap_err(),
            "truncated: header claims 1000 bytes but the file has only 10 bytes"
        );
    }

    #[test]
    fn overlapping_offsets_are_refused() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        let err = parse_file_bytes(&with_header(json, 6)).unwrap_err();
        assert_eq!(err, "tensor \"b\" (data_offsets [2, 6]) overlaps the tensor before it");
    }

    #[test]
    fn offsets_past_the_end_are_truncation() {
        let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let err = parse_file_bytes(&with_header(json, 10)).unwrap_err();
        assert_eq!(err, "truncated: the header needs 16 data bytes but the file holds 10");
    }

    #[test]
    fn dtype_and_size_disagreement_is_refused() {
        let json = r#"{"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,4]}}"#;
        let err = parse_file_bytes(&with_header(json, 4)).unwrap_err();
        assert_eq!(err, "tensor \"a\": BF16 [4] needs 8 bytes but data_offsets [0, 4] span 4");
    }

    #[test]
    fn shape_overflow_is_refused() {
        let json = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#;
        let err = parse_file_bytes(&with_header(json, 0)).unwrap_err();
        assert_eq!(err, "tensor \"a\": shape product overflows");
    }

    #[test]
    fn trailing_bytes_and_gaps_are_refused() {
        let json = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert_eq!(parse_file_bytes(&with_header(json, 3)).unwrap_err(), "1 bytes after the last tensor that no header entry covers");
        let json = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert_eq!(
            parse_file_bytes(&with_header(json, 3)).unwrap_err(),
            "tensor \"a\" (data_offsets [1, 3]) leaves a gap before it"
        );
    }

    #[test]
    fn open_maps_the_file_and_hands_out_exact_bytes() {
        let dir = std::env::temp_dir().join(format!("nibblora-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.safetensors");
        std::fs::write(&path, build(&[("w", "U8", vec![3]), ("v", "I16", vec![2])])).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.bytes(f.tensor("w").unwrap()), &[0, 1, 2]);
        assert_eq!(f.bytes(f.tensor("v").unwrap()), &[3, 4, 5, 6]);
        f.release(f.tensor("w").unwrap());
        assert_eq!(f.bytes(f.tensor("w").unwrap()), &[0, 1, 2], "released pages read back from the file");
        let err = f.tensor("nope").err().unwrap();
        assert!(err.to_string().ends_with("no tensor named \"nope\""), "{err}");
        std::fs::write(&path, &build(&[("w", "U8", vec![3])])[..20]).unwrap();
        assert!(matches!(SafetensorsFile::open(&path), Err(Error::Format { .. })));
        assert!(matches!(SafetensorsFile::open(&dir.join("missing")), Err(Error::Io { not_found: true, .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every accepted header keeps every tensor inside the file and agrees with its dtype width.
    fn assert_sound(bytes: &[u8], h: &Header) {
        for t in &h.tensors {
            assert!(h.data_start + t.end <= bytes.len());
            assert_eq!(t.end - t.begin, t.numel() * t.dtype.size());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(h) = parse_file_bytes(&bytes) { assert_sound(&bytes, &h); }
        }

        #[test]
        fn mutated_valid_files_never_panic_or_read_outside(
            dims in proptest::collection::vec(0usize..5, 0..3),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
            do_cut in any::<bool>(),
        ) {
            let mut bytes = build(&[("a", "BF16", dims.clone()), ("b", "F32", vec![3]), ("c", "U8", dims)]);
            for (at, value) in flips { let i = at % bytes.len(); bytes[i] = value; }
            if do_cut { bytes.truncate(cut % (bytes.len() + 1)); }
            if let Ok(h) = parse_file_bytes(&bytes) { assert_sound(&bytes, &h); }
        }

        #[test]
        fn hostile_offsets_and_shapes_never_panic(
            entries in proptest::collection::vec(
                (0usize..6, proptest::collection::vec(any::<u64>(), 0..4), any::<u64>(), any::<u64>()), 0..5),
            data_len in 0usize..64,
            claimed_len in proptest::option::of(any::<u64>()),
        ) {
            let dtypes = ["BF16", "F32", "U8", "F64", "I8", "NOPE"];
            let mut header = serde_json::Map::new();
            for (i, (d, shape, b, e)) in entries.iter().enumerate() {
                // Mostly small numbers (so some headers pass), sometimes huge ones.
                let small = |v: u64| if v % 3 == 0 { v } else { v % 40 };
                let shape: Vec<u64> = shape.iter().map(|&v| small(v)).collect();
                header.insert(format!("t{i}"), serde_json::json!(
                    {"dtype": dtypes[*d], "shape": shape, "data_offsets": [small(*b), small(*e)]}));
            }
            let json = serde_json::to_vec(&Value::Object(header)).unwrap();
            let mut bytes = claimed_len.unwrap_or(json.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&json);
            bytes.extend(std::iter::repeat_n(7u8, data_len));
            if let Ok(h) = parse_file_bytes(&bytes) { assert_sound(&bytes, &h); }
        }
    }
}
