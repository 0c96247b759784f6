//! The DNS response and ClientHello parsers the eBPF programs run (shared with userspace through
//! `interceptor-ebpf`), on messages built by a real DNS library and a real TLS client, and on broken
//! ones. No privileges needed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use interceptor_ebpf::dns::{self, DNS_EXAMINED, DnsError, learn, message_buffer};
use interceptor_ebpf::hello::{self, HelloError};
use interceptor_ebpf::ipv4_mapped;
use interceptor_ebpf::names::NAME_MAX;
use tests::dns::{Answer, malformed_responses, raw_header, response};

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// What a response yields: the question name, the (address, TTL) answers, and the error that stopped
/// the parse early, if any.
type Learned = (String, Vec<([u8; 16], u32)>, Option<DnsError>);

fn learned(bytes: &[u8]) -> Result<Option<Learned>, DnsError> {
    let (msg, len) = message_buffer(bytes);
    let mut name = [0u8; NAME_MAX];
    Ok(learn(&msg, len, &mut name)?.map(|l| {
        (
            String::from_utf8_lossy(&name[..l.question.name_len]).into_owned(),
            l.addresses[..l.count].to_vec(),
            l.error,
        )
    }))
}

#[test]
fn cname_chain_and_addresses_are_read() -> anyhow::Result<()> {
    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 9);
    let bytes = response(
        "API.OpenAI.com",
        &[
            ("api.openai.com", Answer::Cname("edge.cdn.example.net".into())),
            ("edge.cdn.example.net", Answer::Cname("e1.cdn.example.net".into())),
            ("e1.cdn.example.net", Answer::Address(v4(203, 0, 113, 10))),
            ("e1.cdn.example.net", Answer::Address(v4(203, 0, 113, 11))),
            ("e1.cdn.example.net", Answer::Address(IpAddr::V6(v6))),
        ],
        42,
    )?;
    let (name, addresses, error) = learned(&bytes)?.expect("a response");
    assert_eq!(name, "api.openai.com", "lower-cased question");
    assert_eq!(error, None);
    assert_eq!(
        addresses,
        vec![
            (ipv4_mapped([203, 0, 113, 10]), 42),
            (ipv4_mapped([203, 0, 113, 11]), 42),
            (v6.octets(), 42)
        ]
    );
    Ok(())
}

#[test]
fn queries_and_failures_are_not_responses_to_learn_from() -> anyhow::Result<()> {
    let mut bytes = response(
        "api.openai.com",
        &[("api.openai.com", Answer::Address(v4(203, 0, 113, 10)))],
        60,
    )?;
    let mut query = bytes.clone();
    query[2] &= 0x7f; // QR = 0
    assert_eq!(learned(&query)?, None);
    bytes[3] = (bytes[3] & 0xf0) | 3; // NXDOMAIN
    assert_eq!(learned(&bytes)?, None);
    Ok(())
}

#[test]
fn every_malformed_response_is_refused_without_learning_its_bad_record() -> anyhow::Result<()> {
    for (what, bytes) in malformed_responses("api.openai.com") {
        match learned(&bytes) {
            Err(_) => {}
            Ok(Some((_, addresses, error))) => {
                assert!(error.is_some(), "{what}: parsed without error");
                assert!(addresses.is_empty(), "{what}: learned {addresses:?}");
            }
            Ok(None) => panic!("{what}: taken for a non-response"),
        }
    }
    Ok(())
}

#[test]
fn a_response_cut_at_every_length_never_yields_more_than_the_whole() -> anyhow::Result<()> {
    let bytes = response(
        "api.openai.com",
        &[
            ("api.openai.com", Answer::Cname("edge.example.net".into())),
            ("edge.example.net", Answer::Address(v4(203, 0, 113, 10))),
            ("edge.example.net", Answer::Address(v4(203, 0, 113, 11))),
        ],
        30,
    )?;
    let (_, whole, _) = learned(&bytes)?.expect("a response");
    assert_eq!(whole.len(), 2);
    for cut in 0..bytes.len() {
        if let Ok(Some((_, addresses, error))) = learned(&bytes[..cut]) {
            assert!(addresses.iter().all(|a| whole.contains(a)), "cut at {cut}");
            assert!(addresses.len() < whole.len(), "cut at {cut} learned everything");
            assert!(error.is_some() || addresses.len() < 2, "cut at {cut}");
        }
    }
    Ok(())
}

#[test]
fn long_messages_are_read_up_to_the_examined_size() -> anyhow::Result<()> {
    // 150 A records: the message is longer than the kernel examines; the first 16 are learned.
    let answers: Vec<(&str, Answer)> = (0..150u8)
        .map(|i| ("api.openai.com", Answer::Address(v4(203, 0, 113, i))))
        .collect();
    let bytes = response("api.openai.com", &answers, 60)?;
    assert!(bytes.len() > DNS_EXAMINED);
    let (_, addresses, _) = learned(&bytes)?.expect("a response");
    assert_eq!(addresses.len(), dns::MAX_ANSWERS);
    Ok(())
}

/// Found by the fuzzer: a label holding a dot would read, in text form, as two labels.
#[test]
fn a_label_holding_a_dot_is_refused() {
    let mut bytes = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    bytes.extend_from_slice(b"\x0aapi.openai\x03com\x00\x00\x01\x00\x01");
    assert_eq!(learned(&bytes), Err(DnsError::BadLabel));
}

#[test]
fn pointer_in_question_is_refused() {
    let mut bytes = raw_header("api.openai.com", 0);
    bytes[12] = 0xc0;
    bytes[13] = 0x0c;
    assert_eq!(learned(&bytes), Err(DnsError::BadPointer));
}

/// A real ClientHello, as rustls writes it for `server_name`.
fn client_hello(server_name: &str) -> anyhow::Result<Vec<u8>> {
    // No roots needed: only the first flight is written, nothing is verified.
    let roots = rustls::RootCertStore::empty();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut out = Vec::new();
    connection.write_tls(&mut out)?;
    Ok(out)
}

#[test]
fn server_name_is_read_from_a_real_client_hello() -> anyhow::Result<()> {
    let bytes = client_hello("API.OpenAI.com")?;
    let (msg, len) = message_buffer(&bytes);
    let mut name = [0u8; NAME_MAX];
    let name_len = hello::server_name(&msg, len, &mut name).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(&name[..name_len], b"api.openai.com");
    assert!(hello::looks_like_client_hello(&bytes[..6].try_into()?));
    for cut in 0..bytes.len() {
        let (msg, len) = message_buffer(&bytes[..cut]);
        match hello::server_name(&msg, len, &mut name) {
            Ok(n) => assert_eq!(&name[..n], b"api.openai.com", "cut at {cut}"),
            Err(HelloError::Truncated | HelloError::NotClientHello | HelloError::NoServerName) => {}
            Err(e) => panic!("cut at {cut}: {e:?}"),
        }
    }
    let mut not_hello = bytes.clone();
    not_hello[5] = 2;
    let (msg, len) = message_buffer(&not_hello);
    assert_eq!(
        hello::server_name(&msg, len, &mut name),
        Err(HelloError::NotClientHello)
    );
    Ok(())
}
