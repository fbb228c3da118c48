//! README.md's tables against the code: every error code the server answers, every flag of
//! `coffer serve` with its environment variable, every metric `/metrics` serves and every
//! limit is in the README, and the README names none that do not exist. (That the README's
//! examples run as written is `scripts/readme-walkthrough.sh`.)

mod common;

use std::collections::BTreeSet;

use clap::CommandFactory;
use common::TestServer;

const README: &str = include_str!("../README.md");

/// The text of the README section that starts with the heading `title` (up to the next
/// heading of the same or a higher level).
fn section(title: &str) -> &'static str {
    let start = README
        .find(&format!("\n{title}\n"))
        .unwrap_or_else(|| panic!("README has no section {title:?}"));
    let level = title.chars().take_while(|c| *c == '#').count();
    let body = &README[start + title.len() + 2..];
    let end = body
        .lines()
        .scan(0, |at, line| {
            let here = *at;
            *at += line.len() + 1;
            Some((here, line))
        })
        .find(|(_, line)| {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            hashes > 0 && hashes <= level && line[hashes..].starts_with(' ')
        })
        .map_or(body.len(), |(at, _)| at);
    &body[..end]
}

/// The rows of the tables of a section, as cells (without the header and separator rows).
fn rows(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .filter(|line| line.starts_with('|'))
        .map(|line| {
            line.trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .filter(|cells| !cells.iter().all(|c| c.chars().all(|ch| ch == '-')))
        .collect()
}

/// Every `code span` of a text.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

#[test]
fn every_error_code_is_in_the_readme_table_at_its_status() {
    // Goal: the README's error table is the server's: each (status, code) of the error
    // table `error::kinds::ALL`, and nothing else.
    let mut documented = BTreeSet::new();
    for row in rows(section("## Errors")) {
        let Ok(status) = row[0].parse::<u16>() else {
            continue;
        };
        for code in code_spans(row[1]) {
            if code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                documented.insert((status, code.to_string()));
            }
        }
    }
    let served: BTreeSet<(u16, String)> = coffer::http::error::kinds::ALL
        .iter()
        .map(|kind| (kind.status.as_u16(), kind.code.to_string()))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn every_serve_flag_is_in_the_configuration_table_with_its_environment_variable() {
    // Goal: the Configuration table lists exactly the flags of `coffer serve`, each with the
    // environment variable it reads.
    let mut flags = BTreeSet::new();
    let mut variables = BTreeSet::new();
    for row in rows(section("## Configuration")) {
        for flag in code_spans(row[0]) {
            flags.insert(flag.to_string());
        }
        for variable in code_spans(row[1]) {
            if variable.starts_with("COFFER_") {
                variables.insert(variable.to_string());
            }
        }
    }
    let command = coffer::config::Cli::command();
    let serve = command
        .find_subcommand("serve")
        .expect("a serve subcommand");
    let mut expected_flags = BTreeSet::new();
    let mut expected_variables = BTreeSet::new();
    for argument in serve.get_arguments() {
        let Some(long) = argument.get_long() else {
            continue;
        };
        if long == "help" || long == "version" {
            continue;
        }
        expected_flags.insert(format!("--{long}"));
        if let Some(env) = argument.get_env() {
            expected_variables.insert(env.to_string_lossy().into_owned());
        }
    }
    assert_eq!(flags, expected_flags);
    assert_eq!(variables, expected_variables);
}

#[tokio::test]
async fn every_metric_is_in_the_metrics_table() {
    // Goal: the "Watching it" table names exactly the metric families `/metrics` serves.
    let server = TestServer::start().await;
    // The latency histogram has a family once a request was answered.
    server.get_text("/healthz").await;
    let text = server.get_text("/metrics").await;
    let served: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(served.len() > 10, "{text}");
    let mut documented = BTreeSet::new();
    for row in rows(section("## Watching it")) {
        for name in code_spans(row[0]) {
            if name.starts_with("coffer_") {
                let family = name.split('{').next().unwrap_or(name);
                documented.insert(family.to_string());
            }
        }
    }
    assert_eq!(documented, served);
}

#[test]
fn every_limit_is_in_the_limits_table() {
    // Goal: each limit the server enforces appears in the README's Limits table with the
    // value the code has.
    use coffer::domain::*;
    use coffer::http::*;
    let table = section("## Limits");
    let thousands = |n: usize| {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    assert_eq!(BATCH_BODY_BYTES_MAX, 1 << 20, "the table says 1 MiB");
    assert_eq!(
        coffer::wal::tail::TAIL_BYTES_MAX,
        32 << 20,
        "the table says 32 MiB"
    );
    assert_eq!(DISCARD_BODY_BYTES_MAX, 64 << 10, "the table says 64 KiB");
    let limits = [
        ("AMOUNT_MAX", format!("`1..={AMOUNT_MAX}`")),
        (
            "ACCOUNT_ID_BYTES_MAX",
            format!("1..={ACCOUNT_ID_BYTES_MAX} characters"),
        ),
        (
            "CURRENCY_BYTES_MAX",
            format!("1..={CURRENCY_BYTES_MAX} characters"),
        ),
        (
            "METADATA_KEYS_MAX",
            format!("at most {METADATA_KEYS_MAX} keys"),
        ),
        (
            "METADATA_KEY_CHARS_MAX",
            format!("1..={METADATA_KEY_CHARS_MAX} characters"),
        ),
        (
            "METADATA_VALUE_CHARS_MAX",
            format!("at most {METADATA_VALUE_CHARS_MAX} characters"),
        ),
        (
            "IDEMPOTENCY_KEY_BYTES_MAX",
            format!("1..={IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII"),
        ),
        (
            "HOLD_EXPIRES_SECS_MAX",
            format!("`1..={HOLD_EXPIRES_SECS_MAX}`"),
        ),
        (
            "HOLD_EXPIRES_SECS_DEFAULT",
            format!("default {HOLD_EXPIRES_SECS_DEFAULT}"),
        ),
        (
            "HTTP_BODY_BYTES_MAX",
            format!("{} bytes", thousands(HTTP_BODY_BYTES_MAX)),
        ),
        (
            "BATCH_BODY_BYTES_MAX",
            "1 MiB for `POST /v1/batch`".to_string(),
        ),
        (
            "BATCH_OPERATIONS_MAX",
            format!("| 1..={BATCH_OPERATIONS_MAX} |"),
        ),
        (
            "LIST_LIMIT_MAX",
            format!("`1..={LIST_LIMIT_MAX}`, default {LIST_LIMIT_DEFAULT}"),
        ),
        (
            "EVENTS_WAIT_MS_MAX",
            format!("`0..={}`", events::EVENTS_WAIT_MS_MAX),
        ),
        (
            "EVENTS_SCAN_RECORDS_MAX",
            format!("| {} |", thousands(coffer::engine::EVENTS_SCAN_RECORDS_MAX)),
        ),
        ("TAIL_BYTES_MAX", "32 MiB".to_string()),
        (
            "REQUEST_ID_BYTES_MAX",
            format!("at most {} visible ASCII", guard::REQUEST_ID_BYTES_MAX),
        ),
        (
            "MAILBOX_SEND_WAIT",
            format!("{} ms", coffer::engine::MAILBOX_SEND_WAIT.as_millis()),
        ),
        (
            "DISCARD_BODY_BYTES_MAX",
            format!("64 KiB, within {} s", DISCARD_BODY_WAIT.as_secs()),
        ),
        (
            "RATE_BUCKETS_MAX",
            format!("| {} |", thousands(guard::RATE_BUCKETS_MAX)),
        ),
    ];
    for (name, text) in limits {
        assert!(
            table.contains(&text),
            "the Limits table lacks {name}: {text:?}"
        );
    }
}
