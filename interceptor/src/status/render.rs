//! The status as text, for a terminal.

use std::fmt::Write as _;

use super::{Status, TopRow};

fn duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn top_table(out: &mut String, title: &str, rows: &[TopRow]) {
    let _ = writeln!(out, "\nTop identities, last {title}:");
    if rows.is_empty() {
        let _ = writeln!(out, "  (no requests)");
        return;
    }
    let width = rows.iter().map(|r| r.identity.len()).max().unwrap_or(8).max(8);
    let _ = writeln!(
        out,
        "  {:<width$}  {:>8}  {:>12}  {:>12}",
        "IDENTITY", "REQUESTS", "TOKENS", "COST USD"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "  {:<width$}  {:>8}  {:>12}  {:>12.6}",
            row.identity, row.totals.requests, row.totals.tokens, row.totals.cost_usd
        );
    }
}

/// The status as a few tables.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "interceptor {} — up {}, failure mode {}",
        status.version,
        duration(status.uptime_seconds),
        status.failure_mode
    );
    let _ = writeln!(
        out,
        "Programs attached ({}): {}",
        status.programs.len(),
        status.programs.join(", ")
    );
    let _ = writeln!(out, "\nTargets ({}):", status.targets.len());
    let width = status
        .targets
        .iter()
        .map(|t| t.domain.len())
        .max()
        .unwrap_or(6)
        .max(6);
    for target in &status.targets {
        let _ = writeln!(
            out,
            "  {:<width$}  {:<42}  {}",
            target.domain, target.address, target.source
        );
    }
    top_table(&mut out, "minute", &status.top.minute);
    top_table(&mut out, "hour", &status.top.hour);
    top_table(&mut out, "day", &status.top.day);
    let _ = writeln!(out, "\nRules ({}):", status.rules.len());
    for rule in &status.rules {
        let _ = writeln!(
            out,
            "  {} [{}, per {}] {}",
            rule.name, rule.mode, rule.per, rule.limits
        );
    }
    let _ = writeln!(out, "\nRecent rejections ({}):", status.rejections.len());
    for rejection in &status.rejections {
        let at = time::OffsetDateTime::from_unix_timestamp(i64::try_from(rejection.at).unwrap_or(0))
            .map(|t| format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {at}  {}  {} {}  {} rule={} limit={}",
            rejection.identity,
            rejection.provider,
            rejection.model.as_deref().unwrap_or("-"),
            rejection.status,
            rejection.rule.as_deref().unwrap_or("-"),
            rejection.limit.as_deref().unwrap_or("-"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{RecentRejection, RuleView, TargetView, TopLists, Totals};
    use super::*;

    #[test]
    fn renders_every_section() {
        let status = Status {
            version: "0.1.0".into(),
            uptime_seconds: 3725,
            failure_mode: "open".into(),
            programs: vec!["redirect_connect4".into()],
            targets: vec![TargetView {
                domain: "api.openai.com".into(),
                address: "203.0.113.10:443".into(),
                source: "static".into(),
            }],
            top: TopLists {
                minute: vec![TopRow {
                    identity: "team-a/Deployment/chat".into(),
                    totals: Totals {
                        requests: 3,
                        tokens: 120,
                        cost_usd: 0.0012,
                    },
                }],
                ..TopLists::default()
            },
            rules: vec![RuleView {
                name: "rpm".into(),
                mode: "enforce".into(),
                per: "pod".into(),
                limits: "requestsPerMinute=1".into(),
            }],
            rejections: vec![RecentRejection {
                at: 1_800_000_000,
                identity: "team-a/Deployment/chat".into(),
                provider: "openai".into(),
                model: Some("gpt-4o-mini".into()),
                rule: Some("rpm".into()),
                limit: Some("requests_per_minute".into()),
                status: 429,
            }],
        };
        let text = render(&status);
        assert!(text.contains("up 1h2m, failure mode open"), "{text}");
        assert!(text.contains("api.openai.com  203.0.113.10:443"), "{text}");
        assert!(
            text.contains("team-a/Deployment/chat         3           120      0.001200"),
            "{text}"
        );
        assert!(
            text.contains("Top identities, last hour:\n  (no requests)"),
            "{text}"
        );
        assert!(
            text.contains("rpm [enforce, per pod] requestsPerMinute=1"),
            "{text}"
        );
        assert!(text.contains("429 rule=rpm limit=requests_per_minute"), "{text}");
    }
}
