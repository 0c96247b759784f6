//! Request probing and include_usage injection: never panics; the quick reader reads what serde
//! reads; an injected body is JSON that asks for usage and keeps the model and stream flag.
#![no_main]

use interceptor_protocols::request::{inject_include_usage, probe, quick_probe_agrees_with_serde};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    assert!(quick_probe_agrees_with_serde(data));
    let Ok(facts) = probe(data) else { return };
    if !facts.stream {
        return;
    }
    let Ok(injected) = inject_include_usage(data, &facts) else {
        return;
    };
    let again = probe(&injected).expect("an injected body is still a request body");
    assert!(again.include_usage);
    assert!(again.stream);
    assert_eq!(again.model, facts.model);
});
