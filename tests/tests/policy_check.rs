//! `interceptor policy check FILE` (unprivileged): exit 0 for a valid file, 1 with a precise message
//! (the field and what is wrong with it) for each kind of mistake an operator makes.

use std::process::Command;

const HEADER: &str = "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\n";

fn check(name: &str, body: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("ict-policy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, body).expect("write policy");
    let output = Command::new(tests::daemon::binary())
        .args(["policy", "check"])
        .arg(&path)
        .output()
        .expect("interceptor policy check runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_valid_policy_with_rules_passes() {
    let body = format!(
        "{HEADER}rules:
  - name: team-a
    match: {{namespace: team-a, podLabels: {{app: chat}}}}
    providers: [openai, anthropic]
    per: workload
    models: {{allow: [\"gpt-4o*\", \"claude-*\"], deny: [\"*-preview\"]}}
    limits: {{requestsPerMinute: 60, tokensPerMinute: 100000, tokensPerDay: 5000000, tokenType: output,
              costPerDayUsd: 50, costPerMonthUsd: 1000, maxConcurrent: 10, maxTokensPerRequest: 4096}}
  - name: everyone-observed
    mode: observe
    limits: {{costPerDayUsd: 500}}
"
    );
    let (code, stdout, stderr) = check("valid", &body);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("valid") && stdout.contains("2 rules"), "{stdout}");
}

#[test]
fn each_mistake_is_named_precisely() {
    let rule = |fields: &str| format!("{HEADER}rules:\n  - {{name: r, {fields}}}\n");
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "wrong-type",
            rule("limits: {requestsPerMinute: ten}"),
            &["requestsPerMinute", "invalid type"],
        ),
        (
            "unknown-rule-field",
            rule("limitz: {requestsPerMinute: 1}"),
            &["unknown field `limitz`"],
        ),
        (
            "unknown-limit",
            rule("limits: {requestsPerSecond: 1}"),
            &["unknown field `requestsPerSecond`"],
        ),
        (
            "bad-glob",
            rule("models: {deny: [\"[o1\"]}"),
            &["rules[0] (r).models.deny", "not a valid glob"],
        ),
        (
            "negative-limit",
            rule("limits: {tokensPerDay: -5}"),
            &["rules[0] (r).limits.tokensPerDay", "positive"],
        ),
        (
            "zero-concurrency",
            rule("limits: {maxConcurrent: 0}"),
            &["rules[0] (r).limits.maxConcurrent", "at least 1"],
        ),
        (
            "duplicate-names",
            format!(
                "{HEADER}rules:\n  - {{name: r, limits: {{requestsPerMinute: 1}}}}\n  - {{name: r, limits: {{requestsPerMinute: 2}}}}\n"
            ),
            &["rules[1] (r).name", "used by an earlier rule"],
        ),
        (
            "unknown-provider",
            rule("providers: [openia], limits: {requestsPerMinute: 1}"),
            &["rules[0] (r).providers", "\"openia\" is not a provider"],
        ),
        (
            "no-limit",
            rule("match: {namespace: a}"),
            &["rules[0] (r).limits", "would do nothing"],
        ),
        (
            "empty-name",
            format!("{HEADER}rules:\n  - {{name: \"\", limits: {{requestsPerMinute: 1}}}}\n"),
            &["rules[0].name", "must not be empty"],
        ),
        (
            "bad-mode",
            rule("mode: strict, limits: {requestsPerMinute: 1}"),
            &["unknown variant `strict`"],
        ),
        (
            "bad-scope",
            rule("per: cluster, limits: {requestsPerMinute: 1}"),
            &["unknown variant `cluster`"],
        ),
        (
            "bad-workload",
            rule("match: {workload: chat}, limits: {requestsPerMinute: 1}"),
            &["rules[0] (r).match", "Kind/name"],
        ),
        (
            "bad-selector-field",
            rule("match: {namespaces: [a]}, limits: {requestsPerMinute: 1}"),
            &["unknown field `namespaces`"],
        ),
        (
            "wrong-version",
            "apiVersion: interceptor.dev/v2\nkind: InterceptorPolicy\n".into(),
            &["apiVersion", "not supported"],
        ),
        (
            "unknown-top-level",
            format!("{HEADER}rule: []\n"),
            &["unknown field `rule`"],
        ),
        (
            "empty-bypass",
            format!("{HEADER}interception:\n  bypass:\n    - {{}}\n"),
            &["interception.bypass[0]", "empty selector"],
        ),
        (
            "bad-adapter",
            format!("{HEADER}providers:\n  - {{domain: llm.example.com, adapter: opneai}}\n"),
            &["unknown variant `opneai`"],
        ),
        (
            "duplicate-domain",
            format!(
                "{HEADER}providers:\n  - {{domain: a.example.com, adapter: openai}}\n  - {{domain: A.example.com, adapter: openai}}\n"
            ),
            &["listed twice"],
        ),
        (
            "short-leaf-ttl",
            format!("{HEADER}interception:\n  leafTtl: 1m\n"),
            &["interception.leafTtl", "outside 10m..397d"],
        ),
        ("yaml-syntax", format!("{HEADER}rules: [{{name: r\n"), &["line"]),
        (
            "bad-price",
            format!("{HEADER}pricing:\n  openai:\n    models:\n      gpt-x: {{input: -1, output: 1}}\n"),
            &["pricing"],
        ),
    ];
    assert!(cases.len() >= 15);
    for (name, body, expected) in cases {
        let (code, stdout, stderr) = check(name, &body);
        assert_eq!(code, 1, "{name}: exit code; stdout {stdout:?} stderr {stderr:?}");
        for fragment in expected {
            assert!(
                stderr.contains(fragment),
                "{name}: {fragment:?} not in {stderr:?}"
            );
        }
    }
}

/// The schema shipped for editors is the one the daemon's own types produce.
#[test]
fn the_shipped_json_schema_is_current() {
    let output = Command::new(tests::daemon::binary())
        .args(["policy", "schema"])
        .output()
        .expect("interceptor policy schema runs");
    assert!(output.status.success(), "{output:?}");
    let generated: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.schema.json");
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("deploy/policy.schema.json"))
            .expect("JSON");
    assert_eq!(
        generated, shipped,
        "deploy/policy.schema.json is stale: regenerate it with `interceptor policy schema > deploy/policy.schema.json`"
    );
    // Unknown fields are errors in the daemon; the schema says so too, and knows every section.
    assert_eq!(shipped["additionalProperties"], false);
    for section in [
        "providers",
        "interception",
        "discovery",
        "accounting",
        "pricing",
        "rules",
        "budgetStore",
    ] {
        assert!(
            shipped["properties"][section].is_object(),
            "{section} missing from the schema"
        );
    }
}
