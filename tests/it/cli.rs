//! The `clerkgate` binary as an operator runs it: exit codes, what `check-config` prints, the
//! healthcheck, and `clerkgate dev` end to end.
//!
//! Every child gets a cleared environment (plus `PATH`), so a `CLERK_*` or `CLERKGATE_*`
//! variable on the test machine cannot change the outcome, and every wait on a child is
//! bounded: a hung child is killed and the test fails.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::process::{CHILD_WAIT as WAIT, Running, TempFile, command, run};

/// `clerk.clerk.dev` (clerk-protocol.md §2.5 test vectors).
const PUBLISHABLE_KEY: &str = "pk_test_Y2xlcmsuY2xlcmsuZGV2JA";
const SECRET_KEY: &str = "sk_test_cli_do_not_print_me";
/// Exit code for configuration errors (sysexits EX_USAGE).
const EXIT_CONFIG: i32 = 64;

/// A port on 127.0.0.1 that was free a moment ago (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const KEYS: [(&str, &str); 2] = [
    ("CLERK_SECRET_KEY", SECRET_KEY),
    ("CLERK_PUBLISHABLE_KEY", PUBLISHABLE_KEY),
];

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let out = run(&["check-config"], &KEYS);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.contains("[proxy]"), "{}", out.stdout);
    assert!(out.stdout.contains("[clerk]"), "{}", out.stdout);
    assert!(
        out.stdout.contains("secret_key = \"[redacted]\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains(PUBLISHABLE_KEY), "{}", out.stdout);
    for text in [&out.stdout, &out.stderr] {
        assert!(!text.contains(SECRET_KEY), "the secret leaked:\n{text}");
    }
}

#[test]
fn unknown_key_in_the_config_file_exits_64_naming_the_key() {
    let file = TempFile::with("unknown.toml", "[auth]\nallow_missing_azpp = true\n");
    let out = run(&["--config", file.path(), "check-config"], &KEYS);
    assert_eq!(out.code(), EXIT_CONFIG, "{}", out.stderr);
    assert!(out.stderr.contains("allow_missing_azpp"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[test]
fn bad_value_from_the_environment_exits_64_naming_the_key() {
    let env = [KEYS[0], KEYS[1], ("CLERKGATE_PROXY__LISTEN", "nope")];
    let out = run(&["check-config"], &env);
    assert_eq!(out.code(), EXIT_CONFIG, "{}", out.stderr);
    assert!(out.stderr.contains("proxy.listen"), "{}", out.stderr);
}

#[test]
fn invalid_publishable_key_exits_64_naming_it() {
    let env = [
        ("CLERK_SECRET_KEY", SECRET_KEY),
        // Decodes to `invalidkey$`: no dot in the host.
        ("CLERK_PUBLISHABLE_KEY", "pk_live_aW52YWxpZGtleSQ="),
    ];
    let out = run(&["check-config"], &env);
    assert_eq!(out.code(), EXIT_CONFIG, "{}", out.stderr);
    assert!(
        out.stderr.contains("clerk.publishable_key"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(SECRET_KEY), "{}", out.stderr);
}

#[test]
fn no_key_source_exits_64() {
    for args in [&["check-config"][..], &["serve"], &[]] {
        let out = run(args, &[]);
        assert_eq!(out.code(), EXIT_CONFIG, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("clerk.secret_key"), "{}", out.stderr);
    }
}

#[test]
fn help_lists_every_subcommand() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    for command in ["serve", "check-config", "dev", "healthcheck"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(command)),
            "{command} missing from\n{}",
            out.stdout
        );
    }
}

#[test]
fn healthcheck_exits_1_when_nothing_answers() {
    let out = run(&["healthcheck", "--url", "http://127.0.0.1:1/readyz"], &[]);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("not ready"), "{}", out.stderr);
}

/// A running `clerkgate dev` and what its banner said.
struct Dev {
    _child: Running,
    proxy: String,
    admin: String,
    token: String,
}

/// Starts `clerkgate dev <args>` and reads stdout until the banner's curl line (bounded).
fn start_dev(args: &[&str]) -> Dev {
    let mut child = Running(
        command(&[&["dev"][..], args].concat(), &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn clerkgate dev"),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let (mut proxy, mut admin) = (None, None);
    let token = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the banner's curl line within the deadline");
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("proxy") {
            proxy = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("admin") {
            admin = rest
                .split_whitespace()
                .next()
                .map(|u| u.trim_end_matches("/readyz").to_owned());
        }
        if let Some(rest) = line.strip_prefix("curl -s -H 'Authorization: Bearer ") {
            let (token, url) = rest.split_once("' ").expect("token then URL");
            let proxy = proxy.as_deref().expect("the proxy line comes first");
            assert_eq!(
                url,
                format!("{proxy}/hello"),
                "the curl line uses the proxy"
            );
            break token.to_owned();
        }
    };
    Dev {
        _child: child,
        proxy: proxy.unwrap(),
        admin: admin.expect("the admin line"),
        token,
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn dev_mode_serves_the_printed_token_and_mints_more() {
    let keys = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let dev = start_dev(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        &admin,
        "--keys-listen",
        &keys,
        "--local-api-listen",
        "127.0.0.1:0",
    ]);
    assert!(
        !dev.proxy.ends_with(":0"),
        "the banner shows the bound port, not :0: {}",
        dev.proxy
    );
    assert_eq!(dev.admin, format!("http://{admin}"));

    let readyz = format!("{}/readyz", dev.admin);
    assert!(
        crate::support::eventually(WAIT, async || {
            http()
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "dev never became ready"
    );
    let health = tokio::task::spawn_blocking(move || run(&["healthcheck", "--url", &readyz], &[]))
        .await
        .unwrap();
    assert_eq!(health.code(), 0, "{}", health.stderr);

    let url = format!("{}/hello", dev.proxy);
    let resp = http()
        .get(&url)
        .bearer_auth(&dev.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-id"], "user_dev_123", "{echo}");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");

    let resp = http().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    let minted = tokio::task::spawn_blocking(move || {
        run(&["dev", "--mint", "user_42", "--keys-listen", &keys], &[])
    })
    .await
    .unwrap();
    assert_eq!(minted.code(), 0, "{}", minted.stderr);
    let token = minted.stdout.trim();
    let resp = http().get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-id"], "user_42", "{echo}");
}

#[test]
fn dev_mint_without_a_running_instance_exits_1() {
    let keys = format!("127.0.0.1:{}", free_port());
    let out = run(&["dev", "--mint", "user_42", "--keys-listen", &keys], &[]);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[tokio::test]
async fn dev_mode_accepts_port_0_for_every_listener() {
    let dev = start_dev(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--keys-listen",
        "127.0.0.1:0",
        "--local-api-listen",
        "127.0.0.1:0",
    ]);
    assert!(!dev.proxy.ends_with(":0"), "{}", dev.proxy);
    assert!(!dev.admin.ends_with(":0"), "{}", dev.admin);
    let resp = http()
        .get(format!("{}/hello", dev.proxy))
        .bearer_auth(&dev.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
