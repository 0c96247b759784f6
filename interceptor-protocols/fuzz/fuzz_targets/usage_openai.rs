//! The openai usage extractor behind the response accountant (see `check_usage`).
#![no_main]

use interceptor_protocols::Adapter;
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/completions",
];

fuzz_target!(|data: &[u8]| interceptor_protocols_fuzz::check_usage(Adapter::Openai, &PATHS, data));
