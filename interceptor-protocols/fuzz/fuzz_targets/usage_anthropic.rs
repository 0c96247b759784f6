//! The anthropic usage extractor behind the response accountant (see `check_usage`).
#![no_main]

use interceptor_protocols::Adapter;
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 4] = [
    "/v1/messages",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/complete",
];

fuzz_target!(|data: &[u8]| interceptor_protocols_fuzz::check_usage(Adapter::Anthropic, &PATHS, data));
