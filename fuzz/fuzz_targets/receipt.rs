#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ppml_fuzz_targets::receipt(data));
