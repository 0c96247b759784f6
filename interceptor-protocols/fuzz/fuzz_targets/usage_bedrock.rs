//! The bedrock usage extractor behind the response accountant (see `check_usage`).
#![no_main]

use interceptor_protocols::Adapter;
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 4] = [
    "/model/m/converse",
    "/model/m/converse-stream",
    "/model/m/invoke",
    "/model/m/invoke-with-response-stream",
];

fuzz_target!(|data: &[u8]| interceptor_protocols_fuzz::check_usage(Adapter::Bedrock, &PATHS, data));
