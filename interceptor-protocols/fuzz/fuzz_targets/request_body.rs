//! Request probing and include_usage injection: never panics; an injected body is JSON that asks
//! for usage and keeps the model and stream flag.
#![no_main]

use interceptor_protocols::request::{inject_include_usage, probe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
