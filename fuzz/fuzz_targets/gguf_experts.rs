#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lorafast::core::fuzzing::gguf_experts(data));
