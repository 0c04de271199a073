//! What the TLS tests share: the test CA (checking that the endpoint is up) and a
//! `ferry` run that must fail naming the server whose certificate it did not trust.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_core::testing::services;

use super::ferry_bin;

/// The test CA, after checking that the TLS endpoint at `url` is up. Also installs the
/// rustls provider the binary installs, for the TLS clients of the test's own process.
pub fn ca_for(url: &str) -> PathBuf {
    ferry::tls::install_ring_provider();
    let ca = services::tls_ca_file();
    assert!(
        ca.is_file(),
        "{} is missing: run scripts/services.sh, which makes the test CA and starts the TLS endpoints",
        ca.display()
    );
    let parsed = url::Url::parse(url).unwrap();
    let address = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap());
    assert!(
        std::net::TcpStream::connect(&address).is_ok(),
        "no TLS endpoint at {address} ({url}): run scripts/services.sh, which starts it"
    );
    ca
}

/// Runs `ferry <subcommand>` on a config made of `sections` until it exits (at most 60 s)
/// and returns what it printed; it must fail.
pub fn refused(subcommand: &str, sections: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, sections.join("\n")).unwrap();
    let log = dir.path().join("out.log");
    let mut child = Command::new(ferry_bin())
        .args([subcommand, "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "ferry {subcommand} did not give up on an untrusted certificate within 60 s:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "ferry {subcommand} succeeded:\n{output}");
    output
}

pub fn assert_names_the_certificate(output: &str, endpoint: &str) {
    assert!(
        output.contains("TLS certificate verification failed") && output.contains(endpoint),
        "the error should say the certificate of {endpoint} was not trusted:\n{output}"
    );
}
