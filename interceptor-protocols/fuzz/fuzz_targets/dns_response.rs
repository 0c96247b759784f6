//! The DNS response parser the eBPF ingress program runs: any bytes are parsed without a panic, every
//! loop ends, names stay within DNS limits, and whatever it reads agrees with a full DNS library
//! (hickory-proto) whenever that library accepts the same bytes.
#![no_main]

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use interceptor_ebpf::dns::{MAX_ANSWERS, learn, message_buffer};
use interceptor_ebpf::ipv4_mapped;
use interceptor_ebpf::names::NAME_MAX;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (msg, len) = message_buffer(data);
    let mut name = [0u8; NAME_MAX];
    let Ok(Some(learned)) = learn(&msg, len, &mut name) else {
        return;
    };
    let question = &name[..learned.question.name_len];
    assert!(question.len() <= 253);
    assert!(learned.count <= MAX_ANSWERS);
    assert!(
        !question.iter().any(u8::is_ascii_uppercase),
        "the name is lower-cased"
    );

    let Ok(message) = Message::from_vec(&data[..len]) else {
        return;
    };
    let plain = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' || *b == b'.';
    if question.iter().all(plain) {
        if let Some(theirs) = message.queries().first() {
            // The raw labels (hickory's text form escapes some bytes, e.g. a leading `-`).
            let labels: Vec<Vec<u8>> = theirs.name().iter().map(|l| l.to_ascii_lowercase()).collect();
            assert_eq!(labels.join(&b'.'), question, "question name");
        }
    }
    let theirs: Vec<[u8; 16]> = message
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::A(a) => Some(ipv4_mapped(a.0.octets())),
            RData::AAAA(aaaa) => Some(aaaa.0.octets()),
            _ => None,
        })
        .collect();
    for (address, _) in &learned.addresses[..learned.count] {
        assert!(theirs.contains(address), "{address:?} is not among {theirs:?}");
    }
});
