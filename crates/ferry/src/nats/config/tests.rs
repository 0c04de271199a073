use secrecy::ExposeSecret;

use super::*;

fn key_of(config: &NatsSinkConfig) -> &'static str {
    config.validate().expect_err("must be rejected").key
}

#[test]
fn defaults_are_valid() {
    assert_eq!(NatsSinkConfig::default().validate(), Ok(()));
}

#[test]
fn fencing_follows_partition_exclusive_subjects() {
    let with = |template: &str, fencing: Option<bool>| NatsSinkConfig {
        subject_template: template.into(),
        fencing,
        ..NatsSinkConfig::default()
    };
    let fenced = |config: NatsSinkConfig| config.check().map(|checked| checked.fencing);
    assert_eq!(
        fenced(with("ferry.{aggregate_type}.p{partition}", None)),
        Ok(true)
    );
    assert_eq!(
        fenced(with("ferry.{aggregate_type}.{event_type}", None)),
        Ok(false)
    );
    assert_eq!(
        fenced(with("ferry.{partition}.{aggregate_id}", None)),
        Ok(false)
    );
    assert_eq!(fenced(with("ferry.p{partition}", Some(false))), Ok(false));
    assert_eq!(
        key_of(&with("ferry.{aggregate_type}.{event_type}", Some(true))),
        "fencing"
    );
    assert_eq!(
        key_of(&with("ferry.{partition}.{aggregate_id}", Some(true))),
        "fencing"
    );
}

#[test]
fn bad_keys_are_named() {
    let base = NatsSinkConfig::default;
    assert_eq!(
        key_of(&NatsSinkConfig {
            url: " ".into(),
            ..base()
        }),
        "url"
    );
    assert_eq!(
        key_of(&NatsSinkConfig {
            url: "nats://[::1".into(),
            ..base()
        }),
        "url"
    );
    for stream in ["", "a.b", "a*", "a>", "a b", "a/b"] {
        let config = NatsSinkConfig {
            stream: stream.into(),
            ..base()
        };
        assert_eq!(key_of(&config), "stream", "{stream:?}");
    }
    for subjects in [
        vec![],
        vec!["a..b".to_string()],
        vec!["a.>.b".into()],
        vec!["a b".into()],
    ] {
        let config = NatsSinkConfig { subjects, ..base() };
        assert_eq!(key_of(&config), "subjects");
    }
    assert_eq!(
        key_of(&NatsSinkConfig {
            duplicate_window_secs: 0,
            ..base()
        }),
        "duplicate_window_secs"
    );
    assert_eq!(
        key_of(&NatsSinkConfig {
            max_acks_in_flight: 0,
            ..base()
        }),
        "max_acks_in_flight"
    );
    assert_eq!(
        key_of(&NatsSinkConfig {
            ack_timeout_secs: 0,
            ..base()
        }),
        "ack_timeout_secs"
    );
    assert_eq!(
        key_of(&NatsSinkConfig {
            source: Some("a\r\nb".into()),
            ..base()
        }),
        "source"
    );
    let creds = NatsSinkConfig {
        credentials_file: Some("/nonexistent/x.creds".into()),
        ..base()
    };
    assert_eq!(key_of(&creds), "credentials_file");
}

#[test]
fn template_errors_name_the_key_and_the_allowed_placeholders() {
    let config = NatsSinkConfig {
        subject_template: "ferry.{aggregate}".into(),
        ..NatsSinkConfig::default()
    };
    let err = config.validate().expect_err("unknown placeholder");
    assert_eq!(err.key, "subject_template");
    assert!(err.reason.contains("{aggregate_id}"), "{err}");

    let outside = NatsSinkConfig {
        subject_template: "orders.{event_type}".into(),
        ..NatsSinkConfig::default()
    };
    assert_eq!(key_of(&outside), "subject_template");
}

#[test]
fn several_servers_are_accepted() {
    let config = NatsSinkConfig {
        url: "nats://a:4222, nats://b:4223".into(),
        ..NatsSinkConfig::default()
    };
    let checked = config.check().expect("valid");
    assert_eq!(checked.servers.len(), 2);
    let config = NatsSinkConfig {
        url: "nats://u:pw-s3cret@a:4222, nats://u:pw-s3cret@b:4223".into(),
        ..NatsSinkConfig::default()
    };
    let checked = config.check().expect("valid");
    assert!(!format!("{:?}", checked.servers).contains("s3cret"));
    let (user, password) = checked.credentials.expect("taken from the URL");
    assert_eq!(
        (user.as_str(), password.expose_secret()),
        ("u", "pw-s3cret")
    );
    let config = NatsSinkConfig {
        url: "nats://u:one@a:4222,nats://u:two@b:4222".into(),
        ..NatsSinkConfig::default()
    };
    assert_eq!(config.check().expect_err("differ").key, "url");
}

#[test]
fn content_mode_is_binary_or_structured() {
    let config: NatsSinkConfig =
        serde_json::from_str(r#"{"content_mode":"structured"}"#).expect("parses");
    assert_eq!(config.content_mode, ContentMode::Structured);
    assert_eq!(NatsSinkConfig::default().content_mode, ContentMode::Binary);
    let err = serde_json::from_str::<NatsSinkConfig>(r#"{"content_mode":"batched"}"#)
        .expect_err("unknown mode");
    let text = err.to_string();
    assert!(
        text.contains("batched") && text.contains("structured"),
        "{text}"
    );
}

#[test]
fn unknown_keys_are_refused() {
    let err = serde_json::from_str::<NatsSinkConfig>(r#"{"stream":"X","dedup_window":5}"#)
        .expect_err("unknown key");
    assert!(err.to_string().contains("dedup_window"), "{err}");
    let config: NatsSinkConfig =
        serde_json::from_str(r#"{"stream":"X","token":"s3cret"}"#).expect("parses");
    assert_eq!(config.url, "nats://127.0.0.1:4222");
    assert!(!format!("{config:?}").contains("s3cret"));
    let config: NatsSinkConfig =
        serde_json::from_str(r#"{"url":"nats://u:pw-s3cret@h:4222"}"#).expect("parses");
    assert!(!format!("{config:?}").contains("s3cret"));
}
