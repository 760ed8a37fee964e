//! Reading safetensors files that nobody vouched for.
//!
//! Layout: a u64 little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [begin,
//! end]}, "__metadata__": {str: str}}`, then the data buffer. The `safetensors` crate (the reference
//! implementation, fuzzed upstream) decides whether a header is sound: `SafeTensors::read_metadata` checks the
//! JSON (serde_json's recursion limit turns deeply nested headers into an error), dtype names, shape products
//! and byte sizes (overflow-checked), and that the entries tile the data buffer exactly. On top of it we add
//! what is ours: a check of the header length before anything else, refusal of sub-byte dtypes (we hand out
//! whole bytes per tensor), a memory map with per-tensor page release, and errors that name the file and
//! tensor (when the crate refuses a header without naming the tensor, the header is read again to find it).

use std::fs::File;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Metadata, SafeTensorError, TensorInfo as CrateTensorInfo};
use ::safetensors::SafeTensors;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub use ::safetensors::Dtype;

/// Header lengths above this are refused before anything else is read (the crate refuses above its own,
/// slightly smaller, 100,000,000-byte cap).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Dtype names and widths, on the `safetensors` crate's `Dtype`.
pub trait DtypeExt: Sized {
    /// The dtype a header names ("BF16", "F32", ...), or None.
    fn from_name(name: &str) -> Option<Self>;
    /// Bytes per element. Only meaningful for whole-byte dtypes (the reader refuses the others).
    fn size(self) -> usize;
}

impl DtypeExt for Dtype {
    fn from_name(name: &str) -> Option<Dtype> {
        serde_json::from_value(Value::String(name.to_string())).ok()
    }

    fn size(self) -> usize {
        self.bitsize() / 8
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

/// A checked header: tensors in data order, the metadata (sorted by key), and where the data buffer starts.
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

/// Parse and check a whole safetensors file held in memory (or mapped): the crate's `read_metadata`, then
/// our stricter checks. Errors are phrased for a user and name the tensor when one is at fault.
pub fn parse_file_bytes(bytes: &[u8]) -> std::result::Result<Header, String> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| format!("not a safetensors file (only {} bytes)", bytes.len()))?;
    let n = check_header_len(prefix, bytes.len() as u64)?;
    let data_start = 8 + n;
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| explain(e, &bytes[8..data_start], (bytes.len() - data_start) as u64))?;
    let header = from_metadata(&metadata, data_start)?;
    Ok(header)
}

/// Our view of the crate's checked metadata, refusing dtypes narrower than a byte.
fn from_metadata(metadata: &Metadata, data_start: usize) -> std::result::Result<Header, String> {
    let mut tensors = Vec::with_capacity(metadata.offset_keys().len());
    for name in metadata.offset_keys() {
        let info = metadata.info(&name).ok_or_else(|| format!("tensor {name:?} vanished from the header"))?;
        if !info.dtype.bitsize().is_multiple_of(8) {
            return Err(format!(
                "tensor {name:?}: dtype {} packs elements below a byte, which nibblora does not read",
                info.dtype
            ));
        }
        let (begin, end) = info.data_offsets;
        tensors.push(TensorInfo { name, dtype: info.dtype, shape: info.shape.clone(), begin, end });
    }
    let mut pairs: Vec<(String, String)> =
        metadata.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    pairs.sort();
    Ok(Header { tensors, metadata: pairs, data_start })
}

/// A user-facing message for a header the crate refused. Where the crate does not say which tensor is at
/// fault, the header JSON (already known to be within the size cap) is read again to find it.
fn explain(err: SafeTensorError, json: &[u8], data_len: u64) -> String {
    use SafeTensorError as E;
    match &err {
        E::InvalidHeader(e) => format!("header is not UTF-8 ({e})"),
        E::InvalidHeaderDeserialization(e) | E::JsonError(e) => {
            format!("header is not a valid safetensors JSON object ({e})")
        }
        E::HeaderTooLarge => format!("header is larger than the safetensors library accepts ({err})"),
        E::HeaderTooSmall | E::InvalidHeaderLength => format!("truncated or not a safetensors file ({err})"),
        _ => find_culprit(json, data_len).unwrap_or_else(|| format!("invalid header ({err})")),
    }
}

/// The first inconsistency in a header that parses as JSON: a tensor whose dtype x shape disagrees with its
/// offsets, overlapping or gapped offsets, or data that does not fill the buffer exactly.
fn find_culprit(json: &[u8], data_len: u64) -> Option<String> {
    let map: Map<String, Value> = serde_json::from_slice(json).ok()?;
    let mut entries: Vec<(String, CrateTensorInfo)> = map
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, v)| serde_json::from_value(v).ok().map(|info| (name, info)))
        .collect();
    for (name, info) in &entries {
        let (begin, end) = info.data_offsets;
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()));
        let Some(bits) = bits else { return Some(format!("tensor {name:?}: shape product overflows")) };
        if !bits.is_multiple_of(8) {
            return Some(format!(
                "tensor {name:?}: {} {:?} does not fill whole bytes",
                info.dtype, info.shape
            ));
        }
        if end < begin || end - begin != bits / 8 {
            return Some(format!(
                "tensor {name:?}: {} {:?} needs {} bytes but data_offsets [{begin}, {end}] span {}",
                info.dtype,
                info.shape,
                bits / 8,
                end as i128 - begin as i128
            ));
        }
    }
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let mut cursor = 0usize;
    for (name, info) in &entries {
        let (begin, end) = info.data_offsets;
        if begin != cursor {
            let what =
                if begin < cursor { "overlaps the tensor before it" } else { "leaves a gap before it" };
            return Some(format!("tensor {name:?} (data_offsets [{begin}, {end}]) {what}"));
        }
        cursor = end;
    }
    if cursor as u64 == data_len {
        return None;
    }
    Some(if cursor as u64 > data_len {
        format!("truncated: the header needs {cursor} data bytes but the file holds {data_len}")
    } else {
        format!("{} bytes after the last tensor that no header entry covers", data_len - cursor as u64)
    })
}

/// A checked, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    header: Header,
    index: std::collections::HashMap<String, usize>,
    map: Option<memmap2::Mmap>,
}

impl SafetensorsFile {
    /// Open `path`, check its header length, map the file read-only (mapping reads nothing), and check the
    /// header with the crate before any data byte is handed out.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let format = |message: String| Error::Format { path: path.display().to_string(), message };
        let file = File::open(path).map_err(|e| Error::io(path, &e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, &e))?;
        if meta.is_dir() {
            return Err(format("is a folder, expected a .safetensors file".to_string()));
        }
        let file_len = meta.len();
        if file_len < 8 {
            return Err(format(format!("not a safetensors file (only {file_len} bytes)")));
        }
        // SAFETY: the mapping is read-only and private. Another process truncating the file while we read it
        // would fault (SIGBUS), which no reader of a mapped file can rule out; every claim of the header is
        // checked against the mapping's length before a slice of it is handed out.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, &e))?;
        let header = parse_file_bytes(&map).map_err(format)?;
        let has_data = header.tensors.last().is_some_and(|t| t.end > 0);
        let map = if has_data {
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Sequential);
            Some(map)
        } else {
            None
        };
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), header, index, map })
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
        assert_eq!(
            parse_file_bytes(&with_header(json, 3)).unwrap_err(),
            "1 bytes after the last tensor that no header entry covers"
        );
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
        assert!(matches!(
            SafetensorsFile::open(&dir.join("missing")),
            Err(Error::Io { not_found: true, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        for open in ["[", "{\"a\":"] {
            let json = format!("{{\"t\":{}", open.repeat(100_000));
            let err = parse_file_bytes(&with_header(&json, 0)).unwrap_err();
            assert!(err.contains("recursion limit exceeded"), "{err}");
        }
    }

    #[test]
    fn sub_byte_dtypes_non_string_metadata_and_lone_surrogates_are_refused() {
        let json = r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
        let err = parse_file_bytes(&with_header(json, 2)).unwrap_err();
        assert_eq!(err, "tensor \"a\": dtype F4 packs elements below a byte, which nibblora does not read");
        let json = r#"{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(parse_file_bytes(&with_header(json, 1)).unwrap_err().starts_with("header is not a valid"));
        let json = r#"{"\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let err = parse_file_bytes(&with_header(json, 1)).unwrap_err();
        assert!(err.starts_with("header is not a valid safetensors JSON object"), "{err}");
        let json = r#"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#;
        assert!(parse_file_bytes(&with_header(json, 1)).is_err());
    }

    #[test]
    fn metadata_is_kept_sorted_by_key() {
        let json =
            r#"{"__metadata__":{"z":"1","a":"2"},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let h = parse_file_bytes(&with_header(json, 1)).unwrap();
        assert_eq!(h.metadata, vec![("a".into(), "2".into()), ("z".into(), "1".into())]);
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
                let small = |v: u64| if v.is_multiple_of(3) { v } else { v % 40 };
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
