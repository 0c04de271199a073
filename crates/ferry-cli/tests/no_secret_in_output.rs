//! No secret in output: `ferry` run with a password in every URL and a service token, at
//! debug log level, against the real services, prints none of them on stdout or stderr,
//! whether the connection works (PostgreSQL trusts any password here, NATS has no auth) or
//! fails (wrong port, a password the server refuses, a malformed URL).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

use ferry_core::testing::services;

const PASSWORD: &str = "s3cret-pw-Qx7";
const TOKEN: &str = "t0ken-never-shown-0123456789";

/// `url` with `user:PASSWORD@` as its credentials (any user it had is kept).
fn with_password(url: &str, default_user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user, host) = match rest.split_once('@') {
        Some((credentials, host)) => (credentials.split(':').next().unwrap_or(""), host),
        None => (default_user, rest),
    };
    format!("{scheme}://{user}:{PASSWORD}@{host}")
}

/// `url` with its port replaced by one nothing listens on.
fn wrong_port(url: &str) -> String {
    let (before, after) = url.rsplit_once(':').expect("a port");
    let tail = after.find('/').map_or("", |i| &after[i..]);
    format!("{before}:1{tail}")
}

/// Tables and streams of this test's own.
fn unique_tag() -> String {
    Uuid::now_v7().simple().to_string()[20..].to_owned()
}

fn write_config(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config written");
    path
}

/// Runs `ferry args…` to its end (or SIGTERM after `run_for`), returning its exit success
/// and everything it printed.
fn run(args: &[&str], config: &Path, run_for: Option<Duration>) -> (bool, String) {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("FERRY_LOG", "debug")
        .env("FERRY_CHECK_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(out.reopen().expect("reopen"))
        .stderr(out.reopen().expect("reopen"))
        .spawn()
        .expect("ferry starts");
    let deadline = Instant::now() + run_for.unwrap_or(Duration::from_secs(60));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let pid = i32::try_from(child.id()).expect("pid");
            kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
            break child.wait().expect("exits after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let bytes = std::fs::read(out.path()).expect("output");
    (
        status.success(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn assert_no_secret(what: &str, output: &str) {
    assert!(
        !output.contains(PASSWORD) && !output.contains(TOKEN),
        "{what} printed a secret:\n{output}"
    );
}

fn service_section() -> String {
    format!(
        "[service]\nlisten = \"127.0.0.1:0\"\ncheck_bearer_token = \"{TOKEN}\"\n\
         [[service.tokens]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\nscopes = [\"admin\"]\n"
    )
}

#[test]
fn passwords_in_working_urls_are_never_printed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tag = unique_tag();
    let config = write_config(
        dir.path(),
        "working",
        &format!(
            "[store]\ntype = \"postgres\"\nurl = \"{}\"\n\
             [outbox]\ntable_prefix = \"sec{tag}_\"\npartitions = 2\n\
             [sink]\ntype = \"nats\"\nurl = \"{}\"\nstream = \"SEC_{tag}\"\nsubjects = [\"sec{tag}.>\"]\n\
             subject_template = \"sec{tag}.{{aggregate_type}}\"\n{}",
            with_password(&services::postgres_url(), "postgres"),
            with_password(&services::nats_url(), "ferry"),
            service_section(),
        ),
    );
    let (ok, output) = run(&["migrate"], &config, None);
    assert!(ok && output.contains("migrated"), "{output}");
    assert_no_secret("migrate", &output);
    for args in [&["status"][..], &["status", "--json"]] {
        let (ok, output) = run(args, &config, None);
        assert!(ok, "{output}");
        assert_no_secret("status", &output);
    }
    let (_, output) = run(&["relay"], &config, Some(Duration::from_secs(4)));
    assert!(output.contains("nats sink connected"), "{output}");
    assert_no_secret("relay", &output);
}

#[test]
fn passwords_in_failing_urls_are_never_printed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tag = unique_tag();
    let rest = format!(
        "[outbox]\ntable_prefix = \"sec{tag}_\"\n[sink]\ntype = \"stdout\"\n{}",
        service_section()
    );
    let pg = with_password(&services::postgres_url(), "postgres");
    let stores = [
        ("postgres, wrong port", "postgres", wrong_port(&pg)),
        (
            "mysql, refused password",
            "mysql",
            with_password(&services::mysql_url(), "root"),
        ),
        (
            "redis, refused password",
            "redis",
            with_password(&services::redis_url(), ""),
        ),
        (
            "postgres, malformed",
            "postgres",
            format!("postgres://u:{PASSWORD}@127.0.0.1:notaport/db"),
        ),
    ];
    for (what, store, url) in stores {
        let config = write_config(
            dir.path(),
            store,
            &format!("[store]\ntype = \"{store}\"\nurl = \"{url}\"\n{rest}"),
        );
        let (ok, output) = run(&["migrate"], &config, None);
        assert!(!ok && output.contains("error"), "{what}: {output}");
        assert_no_secret(what, &output);
    }

    // A working store, with a sink and a lease backend that refuse or cannot be reached:
    // the relay and status retry and warn, with the URLs in their errors.
    let working = format!(
        "[store]\ntype = \"postgres\"\nurl = \"{pg}\"\n[outbox]\ntable_prefix = \"sec{tag}_\"\n"
    );
    let leases = write_config(
        dir.path(),
        "leases",
        &format!(
            "{working}[sink]\ntype = \"stdout\"\n[leases]\ntype = \"redis\"\nurl = \"{}\"\n",
            wrong_port(&with_password(&services::redis_url(), "ferry"))
        ),
    );
    let (ok, output) = run(&["migrate"], &leases, None);
    assert!(ok, "{output}");
    let (_, output) = run(&["status"], &leases, None);
    assert!(output.contains("lease owners unknown"), "{output}");
    assert_no_secret("status with unreachable leases", &output);
    let (_, output) = run(&["relay"], &leases, Some(Duration::from_secs(3)));
    assert!(output.contains("leases"), "{output}");
    assert_no_secret("relay with unreachable leases", &output);

    let amqp = write_config(
        dir.path(),
        "amqp",
        &format!(
            "{working}[sink]\ntype = \"amqp\"\nurl = \"{}\"\n",
            with_password(&services::amqp_url(), "guest")
        ),
    );
    let (_, output) = run(&["relay"], &amqp, Some(Duration::from_secs(4)));
    assert!(output.contains("sink"), "{output}");
    assert_no_secret("relay with a refused RabbitMQ password", &output);

    // A config that fails to load: the error names the key, not the URL.
    let bad = write_config(
        dir.path(),
        "bad",
        &format!("{working}url_typo = \"{pg}\"\n[sink]\ntype = \"stdout\"\n"),
    );
    let (ok, output) = run(&["status"], &bad, None);
    assert!(!ok && output.contains("url_typo"), "{output}");
    assert_no_secret("a config error", &output);
}

/// A Kafka sink with a SASL password, against a broker that does not take it: the relay
/// retries and logs why (librdkafka's own logs included, at debug level), never the
/// password; nor does a config error about the SASL settings.
#[cfg(feature = "kafka")]
#[test]
fn a_kafka_sasl_password_is_never_printed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tag = unique_tag();
    let working = format!(
        "[store]\ntype = \"postgres\"\nurl = \"{}\"\n[outbox]\ntable_prefix = \"sec{tag}_\"\n",
        services::postgres_url()
    );
    let sink = format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{}\"\nsecurity_protocol = \"sasl_plaintext\"\n\
         sasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"relay\"\nsasl_password = \"{PASSWORD}\"\n",
        services::kafka_brokers()
    );
    let config = write_config(dir.path(), "kafka", &format!("{working}{sink}"));
    let (ok, output) = run(&["migrate"], &config, None);
    assert!(ok, "{output}");
    let (_, output) = run(&["relay"], &config, Some(Duration::from_secs(6)));
    assert!(output.contains("kafka"), "{output}");
    assert_no_secret("relay with a refused SASL login", &output);
    let bad = write_config(
        dir.path(),
        "kafka-bad",
        &format!("{working}{}", sink.replace("sasl_plaintext", "ssl")),
    );
    let (ok, output) = run(&["relay"], &bad, None);
    assert!(!ok && output.contains("security_protocol"), "{output}");
    assert_no_secret("a SASL config error", &output);
}
