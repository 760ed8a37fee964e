//! cargo +nightly fuzz run safetensors_header: any bytes as a whole safetensors file, through nibblora's
//! wrapper of the safetensors crate (`parse_file_bytes`: the crate's `read_metadata` plus our checks). It must
//! return an error or a header whose every tensor lies inside the input and matches its dtype width; never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibblora_core::safetensors::{parse_file_bytes, DtypeExt};

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_file_bytes(data) {
        for t in &header.tensors {
            assert!(header.data_start + t.end <= data.len());
            assert_eq!(t.end - t.begin, t.numel() * t.dtype.size());
        }
    }
});
