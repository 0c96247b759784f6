//! The gemini usage extractor behind the response accountant (see `check_usage`).
#![no_main]

use interceptor_protocols::Adapter;
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 4] = [
    "/v1beta/models/m:generateContent",
    "/v1beta/models/m:streamGenerateContent",
    "/v1beta/models/m:embedContent",
    "/v1/models/m:streamGenerateContent",
];

fuzz_target!(|data: &[u8]| interceptor_protocols_fuzz::check_usage(Adapter::Gemini, &PATHS, data));
