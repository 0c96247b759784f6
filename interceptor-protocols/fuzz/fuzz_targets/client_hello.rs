//! The ClientHello server-name reader the eBPF egress program runs: any bytes are read without a
//! panic, and a name it returns is a lower-case DNS-length name taken from the input.
#![no_main]

use interceptor_ebpf::dns::message_buffer;
use interceptor_ebpf::hello::server_name;
use interceptor_ebpf::names::NAME_MAX;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (msg, len) = message_buffer(data);
    let mut name = [0u8; NAME_MAX];
    let Ok(name_len) = server_name(&msg, len, &mut name) else {
        return;
    };
    assert!((1..=253).contains(&name_len));
    let found = &name[..name_len];
    assert!(!found.iter().any(u8::is_ascii_uppercase));
    let lowered: Vec<u8> = data[..len].iter().map(u8::to_ascii_lowercase).collect();
    assert!(
        lowered.windows(name_len).any(|w| w == found),
        "the name comes from the input"
    );
});
