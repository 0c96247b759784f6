//! The usage-chunk stripper: split invariance, a stream without usage passes unchanged, and the
//! shortcut for OpenAI's chunks rewrites them as the full read of their members does.
#![no_main]

use interceptor_protocols::strip::{UsageChunkStripper, shortcut_agrees_with_full_read};
use libfuzzer_sys::fuzz_target;

fn strip(chunks: &[&[u8]]) -> Vec<u8> {
    let mut stripper = UsageChunkStripper::new(512);
    let mut out = Vec::new();
    for chunk in chunks {
        stripper.push(chunk, &mut out);
    }
    stripper.finish(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&at, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(at).min(body.len());
    assert!(shortcut_agrees_with_full_read(body));
    // Most inputs do not end as OpenAI's chunks do: give them that ending too.
    let mut chunk = body.to_vec();
    chunk.extend_from_slice(br#","usage":null}"#);
    assert!(shortcut_agrees_with_full_read(&chunk));
    let whole = strip(&[body]);
    if body.len() < 512 {
        // Under the limit the filter never turns itself off, so chunking cannot matter.
        assert_eq!(whole, strip(&[&body[..at], &body[at..]]));
    }
    if memchr_usage(body) {
        return;
    }
    assert_eq!(whole, body, "streams without usage pass byte for byte");
});

fn memchr_usage(body: &[u8]) -> bool {
    body.windows(7).any(|w| w == b"\"usage\"")
}
