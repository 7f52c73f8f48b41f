#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lorafast::core::fuzzing::expert_adapter(data));
