//! The names the kernel watches in DNS answers and TLS ClientHellos: provider domains (their answers
//! become targets; a ClientHello for one to a non-target is an escape) and encrypted-DNS endpoints
//! (counted as a hint that a workload's DNS is invisible to the node).
//!
//! Domain indices are positions in [`watched_domains`]: provider targets first, in the order of
//! `Policy::provider_targets` (the same indices target discovery uses), then the encrypted-DNS names.

use std::collections::BTreeMap;

use interceptor_ebpf::names::{PATTERN_NONE, pattern_entry};
use interceptor_ebpf::{
    DOMAIN_FLAG_ENCRYPTED_DNS, DOMAIN_FLAG_PROVIDER, DomainInfo, MAX_DOMAINS, MAX_WATCHED, PORTS_PER_DOMAIN,
    WatchedSuffix,
};
use tracing::{info, warn};

use crate::ebpf::{EbpfError, WatchedNames};
use crate::policy::ProviderTarget;

/// One watched name pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedDomain {
    pub pattern: String,
    pub info: DomainInfo,
}

/// The domain table (see the module documentation for the index order).
pub fn watched_domains(targets: &[ProviderTarget], encrypted_dns: &[String]) -> Vec<WatchedDomain> {
    let providers = targets.iter().map(|target| {
        let mut ports = [0u16; PORTS_PER_DOMAIN];
        for (slot, port) in ports.iter_mut().zip(&target.ports) {
            *slot = *port;
        }
        WatchedDomain {
            pattern: target.domain.clone(),
            info: DomainInfo {
                ports,
                flags: DOMAIN_FLAG_PROVIDER,
                _pad: 0,
            },
        }
    });
    let hints = encrypted_dns.iter().map(|name| WatchedDomain {
        pattern: name.to_ascii_lowercase(),
        info: DomainInfo {
            ports: [0; PORTS_PER_DOMAIN],
            flags: DOMAIN_FLAG_ENCRYPTED_DNS,
            _pad: 0,
        },
    });
    providers.chain(hints).collect()
}

/// A pattern the kernel cannot watch, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwatched {
    pub pattern: String,
    pub reason: &'static str,
}

/// The watched-suffix map contents for `domains`, and the patterns that cannot be watched.
pub fn suffix_entries(domains: &[WatchedDomain]) -> (BTreeMap<u64, WatchedSuffix>, Vec<Unwatched>) {
    let mut entries: BTreeMap<u64, WatchedSuffix> = BTreeMap::new();
    let mut unwatched = Vec::new();
    for (index, domain) in domains.iter().enumerate() {
        let refuse = |reason| Unwatched {
            pattern: domain.pattern.clone(),
            reason,
        };
        let Ok(index) = u16::try_from(index) else {
            unwatched.push(refuse("more watched names than the kernel table holds"));
            continue;
        };
        if u32::from(index) >= MAX_DOMAINS {
            unwatched.push(refuse("more watched names than the kernel table holds"));
            continue;
        }
        let (hash, pattern) = match pattern_entry(&domain.pattern, index) {
            Ok(entry) => entry,
            Err(reason) => {
                unwatched.push(refuse(reason));
                continue;
            }
        };
        if !entries.contains_key(&hash) && entries.len() >= MAX_WATCHED as usize {
            unwatched.push(refuse("more watched suffixes than the kernel map holds"));
            continue;
        }
        let suffix = entries.entry(hash).or_default();
        match suffix.patterns.iter_mut().find(|p| p.kind == PATTERN_NONE) {
            Some(slot) => *slot = pattern,
            None => unwatched.push(refuse("too many patterns share this suffix")),
        }
    }
    (entries, unwatched)
}

/// Fills the kernel's domain table and suffix map.
pub fn install(names: &mut WatchedNames, domains: &[WatchedDomain]) -> Result<(), EbpfError> {
    let (entries, unwatched) = suffix_entries(domains);
    for skipped in &unwatched {
        warn!(
            pattern = %skipped.pattern,
            reason = skipped.reason,
            "name not watched in DNS answers and ClientHellos (the daemon's own resolution still applies)"
        );
    }
    for (index, domain) in domains.iter().enumerate().take(MAX_DOMAINS as usize) {
        names.set_domain(index as u32, domain.info)?;
    }
    for (hash, suffix) in &entries {
        names.set_suffix(*hash, *suffix)?;
    }
    info!(
        domains = domains.len() - unwatched.len(),
        suffixes = entries.len(),
        "watched names installed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use interceptor_ebpf::names::{Candidates, NAME_MAX, SuffixTable, match_name, name_buffer};

    use super::*;
    use crate::policy::Policy;

    struct Table(BTreeMap<u64, WatchedSuffix>);

    impl SuffixTable for Table {
        fn get(&self, hash: u64) -> Option<WatchedSuffix> {
            self.0.get(&hash).copied()
        }
    }

    fn lookup(table: &Table, domains: &[WatchedDomain], name: &str) -> Option<String> {
        let (buffer, len): ([u8; NAME_MAX], usize) = name_buffer(name.as_bytes())?;
        match_name(&buffer, len, table, &mut Candidates::default())
            .map(|i| domains[i as usize].pattern.clone())
    }

    /// The kernel's hash matcher agrees with the proxy's string matcher on the built-in catalog.
    #[test]
    fn kernel_matcher_agrees_with_domain_matches() {
        let policy = Policy::builtin().expect("built-in policy");
        let domains = watched_domains(&policy.provider_targets(), &policy.discovery.encrypted_dns_names);
        let (entries, unwatched) = suffix_entries(&domains);
        assert_eq!(unwatched, vec![], "every built-in pattern is watchable");
        let table = Table(entries);
        let names = [
            "api.openai.com",
            "API.OpenAI.com",
            "myres.openai.azure.com",
            "a.b.openai.azure.com",
            "openai.azure.com",
            "x.cognitiveservices.azure.com",
            "us-central1-aiplatform.googleapis.com",
            "aiplatform.googleapis.com",
            "-aiplatform.googleapis.com",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "bedrock-runtime..amazonaws.com",
            "bedrock.us-east-1.amazonaws.com",
            "s3.amazonaws.com",
            "generativelanguage.googleapis.com",
            "api.anthropic.com",
            "evil-api.openai.com",
            "api.openai.com.evil.net",
            "openai.com",
            "dns.google",
            "mozilla.cloudflare-dns.com",
            "example.com",
        ];
        for name in names {
            // The most specific match: the exact domain, else the wildcard with the longest suffix.
            let lower = name.to_ascii_lowercase();
            let specificity = |pattern: &str| match pattern.split_once('*') {
                None => usize::MAX,
                Some((_, suffix)) => suffix.len(),
            };
            let expected = domains
                .iter()
                .filter(|d| crate::providers::domain_matches(&d.pattern, &lower))
                .max_by_key(|d| specificity(&d.pattern))
                .map(|d| d.pattern.clone());
            assert_eq!(lookup(&table, &domains, name), expected, "{name}");
        }
    }

    #[test]
    fn patterns_the_kernel_cannot_match_are_reported() {
        let target = |domain: &str| ProviderTarget {
            domain: domain.into(),
            adapter: crate::providers::Adapter::OpenaiCompatible,
            name: "x".into(),
            addresses: vec![],
            ports: vec![443, 8443],
        };
        let domains = watched_domains(
            &[
                target("api*x.example.com"),
                target("ok.example.com"),
                target("*.example.net"),
            ],
            &[],
        );
        assert_eq!(domains[1].info.ports, [443, 8443, 0, 0]);
        let (entries, unwatched) = suffix_entries(&domains);
        assert_eq!(entries.len(), 2);
        assert_eq!(unwatched.len(), 1);
        assert_eq!(unwatched[0].pattern, "api*x.example.com");
    }

    #[test]
    fn five_patterns_sharing_a_suffix_overflow_cleanly() {
        let target = |domain: String| ProviderTarget {
            domain,
            adapter: crate::providers::Adapter::OpenaiCompatible,
            name: "x".into(),
            addresses: vec![],
            ports: vec![443],
        };
        let targets: Vec<_> = (0..5).map(|i| target(format!("p{i}*.example.com"))).collect();
        let domains = watched_domains(&targets, &[]);
        let (entries, unwatched) = suffix_entries(&domains);
        assert_eq!(entries.len(), 1);
        assert_eq!(unwatched.len(), 1, "the fifth pattern does not fit");
        let table = Table(entries);
        assert_eq!(
            lookup(&table, &domains, "p3x.example.com").as_deref(),
            Some("p3*.example.com")
        );
    }
}
