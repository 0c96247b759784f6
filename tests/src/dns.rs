//! A small authoritative DNS server for the simulated node (a pod's own resolver: CoreDNS or
//! NodeLocal DNSCache in a real cluster), over UDP and TCP, whose answers a test changes while it
//! runs; and builders of DNS messages (well-formed and deliberately broken) for parser tests.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::node::ProviderNetns;

/// One answer record of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Address(IpAddr),
    Cname(String),
}

/// A canned raw reply for a name: sent as is, whatever was asked (for malformed-packet tests).
pub type RawReply = Vec<u8>;

#[derive(Default)]
struct Zone {
    records: HashMap<String, (Vec<Answer>, u32)>,
    raw: HashMap<String, RawReply>,
}

/// The running server. Dropping it stops the threads.
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    /// Queries answered (UDP and TCP).
    pub queries: Arc<AtomicU64>,
}

impl DnsServer {
    /// Starts serving on `addr` port 53 (UDP and TCP) inside `netns`.
    pub fn start(netns: &ProviderNetns, addr: IpAddr) -> anyhow::Result<Self> {
        let socket_addr = SocketAddr::new(addr, 53);
        let sockets = netns.enter(move || bind(socket_addr))?;
        Self::serve(socket_addr, sockets)
    }

    /// Starts serving on `addr` port 53 in the current network namespace (a loopback address).
    pub fn start_here(addr: IpAddr) -> anyhow::Result<Self> {
        let socket_addr = SocketAddr::new(addr, 53);
        Self::serve(socket_addr, bind(socket_addr)?)
    }

    fn serve(socket_addr: SocketAddr, (udp, tcp): (UdpSocket, TcpListener)) -> anyhow::Result<Self> {
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        tcp.set_nonblocking(true)?;
        let server = Self {
            addr: socket_addr,
            zone: Arc::default(),
            stop: Arc::default(),
            queries: Arc::default(),
        };
        let (zone, stop, queries) = (server.zone.clone(), server.stop.clone(), server.queries.clone());
        std::thread::spawn(move || serve_udp(udp, &zone, &stop, &queries));
        let (zone, stop, queries) = (server.zone.clone(), server.stop.clone(), server.queries.clone());
        std::thread::spawn(move || serve_tcp(tcp, &zone, &stop, &queries));
        Ok(server)
    }

    /// Sets the answers (and their TTL) for `name`.
    pub fn set(&self, name: &str, answers: Vec<Answer>, ttl: u32) {
        if let Ok(mut zone) = self.zone.lock() {
            zone.records.insert(name.to_ascii_lowercase(), (answers, ttl));
        }
    }

    /// Makes every query for `name` get `reply` verbatim.
    pub fn set_raw(&self, name: &str, reply: RawReply) {
        if let Ok(mut zone) = self.zone.lock() {
            zone.raw.insert(name.to_ascii_lowercase(), reply);
        }
    }
}

fn bind(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).with_context(|| format!("binding DNS/UDP {addr}"))?;
    let tcp = TcpListener::bind(addr).with_context(|| format!("binding DNS/TCP {addr}"))?;
    Ok((udp, tcp))
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_udp(socket: UdpSocket, zone: &Mutex<Zone>, stop: &AtomicBool, queries: &AtomicU64) {
    let mut buffer = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, peer)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        if let Some(reply) = reply_to(&buffer[..len], zone) {
            queries.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&reply, peer);
        }
    }
}

fn serve_tcp(listener: TcpListener, zone: &Mutex<Zone>, stop: &AtomicBool, queries: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        // One query per connection is all the tests need; a real resolver would pipeline.
        let mut prefix = [0u8; 2];
        if stream.read_exact(&mut prefix).is_err() {
            continue;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
        if stream.read_exact(&mut query).is_err() {
            continue;
        }
        if let Some(reply) = reply_to(&query, zone) {
            queries.fetch_add(1, Ordering::Relaxed);
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            let _ = stream.write_all(&framed);
        }
    }
}

/// The reply to one query, as the zone says: NOERROR with the matching records (A or AAAA after the
/// CNAME chain), NODATA when the name has none of that type, NXDOMAIN for unknown names.
fn reply_to(query: &[u8], zone: &Mutex<Zone>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let zone = zone.lock().ok()?;
    if let Some(raw) = zone.raw.get(&name) {
        let mut raw = raw.clone();
        if raw.len() >= 2 {
            raw[..2].copy_from_slice(&request.id().to_be_bytes());
        }
        return Some(raw);
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .add_query(question.clone());
    let mut current = name.clone();
    let mut found = false;
    for _ in 0..8 {
        let Some((answers, ttl)) = zone.records.get(&current) else {
            break;
        };
        found = true;
        let owner = Name::from_ascii(format!("{current}.")).ok()?;
        let mut next = None;
        for answer in answers {
            match answer {
                Answer::Cname(target) => {
                    let target_name = Name::from_ascii(format!("{target}.")).ok()?;
                    response.add_answer(Record::from_rdata(
                        owner.clone(),
                        *ttl,
                        RData::CNAME(CNAME(target_name)),
                    ));
                    next = Some(target.to_ascii_lowercase());
                }
                Answer::Address(IpAddr::V4(v4)) if question.query_type() == RecordType::A => {
                    response.add_answer(Record::from_rdata(owner.clone(), *ttl, RData::A(A(*v4))));
                }
                Answer::Address(IpAddr::V6(v6)) if question.query_type() == RecordType::AAAA => {
                    response.add_answer(Record::from_rdata(owner.clone(), *ttl, RData::AAAA(AAAA(*v6))));
                }
                Answer::Address(_) => {}
            }
        }
        match next {
            Some(next) => current = next,
            None => break,
        }
    }
    if !found {
        response.set_response_code(ResponseCode::NXDomain);
    }
    response.to_vec().ok()
}

/// A response to `name` (type A) with `answers`, each owned by the name that introduced it.
pub fn response(name: &str, answers: &[(&str, Answer)], ttl: u32) -> anyhow::Result<Vec<u8>> {
    let mut message = Message::new();
    let qname = Name::from_ascii(format!("{name}."))?;
    message
        .set_id(0x1234)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .add_query(Query::query(qname, RecordType::A));
    for (owner, answer) in answers {
        let owner = Name::from_ascii(format!("{owner}."))?;
        let rdata = match answer {
            Answer::Address(IpAddr::V4(v4)) => RData::A(A(*v4)),
            Answer::Address(IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
            Answer::Cname(target) => RData::CNAME(CNAME(Name::from_ascii(format!("{target}."))?)),
        };
        message.add_answer(Record::from_rdata(owner, ttl, rdata));
    }
    Ok(message.to_vec()?)
}

/// The header and question of a response for `name` announcing `answers` records, as raw bytes
/// (the start of a hand-built, possibly broken, message).
pub fn raw_header(name: &str, answers: u16) -> Vec<u8> {
    let mut out = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.extend_from_slice(&[0, 0, 1, 0, 1]);
    out
}

/// Broken responses for `name`, each with what is wrong: the parser must reject each one.
pub fn malformed_responses(name: &str) -> Vec<(&'static str, Vec<u8>)> {
    let a_record = |owner: &[u8]| {
        let mut record = owner.to_vec();
        record.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 99]);
        record
    };
    let mut truncated = raw_header(name, 1);
    truncated.extend_from_slice(&a_record(&[0xc0, 0x0c]));
    truncated.truncate(truncated.len() - 2);

    // The answer's owner name points at itself: a compression loop.
    let mut looped = raw_header(name, 1);
    let here = looped.len() as u16;
    looped.extend_from_slice(&a_record(&(0xc000 | here).to_be_bytes()));

    // A question name of 300 characters (longer than DNS allows).
    let long_name = vec!["a".repeat(60); 5].join(".");
    let mut oversized = raw_header(&long_name, 1);
    oversized.extend_from_slice(&a_record(&[0xc0, 0x0c]));

    // A label length with the reserved bits 01.
    let mut bad_label = raw_header(name, 1);
    bad_label.extend_from_slice(&a_record(&[0x41, b'x', 0]));

    // The record data runs past the end of the message.
    let mut overrun = raw_header(name, 1);
    let mut record = a_record(&[0xc0, 0x0c]);
    let len_at = record.len() - 6;
    record[len_at..len_at + 2].copy_from_slice(&200u16.to_be_bytes());
    overrun.extend_from_slice(&record);

    vec![
        ("truncated record", truncated),
        ("compression loop", looped),
        ("name longer than 253 characters", oversized),
        ("reserved label type", bad_label),
        ("record data past the end", overrun),
    ]
}
