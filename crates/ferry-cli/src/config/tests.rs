//! The config checks, and a parse of every example config in the repository.

use super::*;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = Config::load(&path);
            #[cfg(not(feature = "kafka"))]
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("type = \"kafka\"")) {
                let err = format!("{:#}", loaded.expect_err("kafka is not built in"));
                assert!(err.contains("--features kafka"), "{err}");
                seen += 1;
                continue;
            }
            loaded.unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 4,
        "expected an example per store and sink pair, found {seen}"
    );
}

fn error_of(text: &str) -> String {
    format!(
        "{:#}",
        Config::from_toml(text).expect_err("must be refused")
    )
}

const MINIMAL: &str = "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n[sink]\ntype = \"stdout\"\n";

#[test]
fn minimal_config_takes_the_defaults() {
    let config = Config::from_toml(MINIMAL).expect("valid");
    assert_eq!(config.outbox.partitions, 16);
    assert_eq!(config.relay.batch_size, 1000);
}

#[test]
fn unknown_keys_are_named() {
    let err = error_of(&format!("{MINIMAL}[relay]\nbatch_sise = 5\n"));
    assert!(err.contains("batch_sise"), "{err}");
    let err = error_of(
        "[store]\ntype = \"sqlite\"\npath = \"x\"\nurl = \"y\"\n[sink]\ntype = \"stdout\"\n",
    );
    assert!(err.contains("url"), "{err}");
}

#[test]
fn mysql_store_takes_a_url_and_a_pool_size() {
    let config = Config::from_toml(
        "[store]\ntype = \"mysql\"\nurl = \"mysql://root@127.0.0.1:3306/test\"\n[sink]\ntype = \"stdout\"\n",
    )
    .expect("valid");
    assert!(matches!(
        config.store,
        StoreConfig::Mysql { pool_size: 8, .. }
    ));
    let err = error_of(
        "[store]\ntype = \"mysql\"\nurl = \"mysql://x@h/d\"\npool_size = 1\n[sink]\ntype = \"stdout\"\n",
    );
    assert!(err.contains("store.pool_size"), "{err}");
    let err = error_of("[store]\ntype = \"mysql\"\n[sink]\ntype = \"stdout\"\n");
    assert!(err.contains("url"), "{err}");
}

#[test]
fn unknown_variants_list_the_allowed_ones() {
    let err = error_of("[store]\ntype = \"oracle\"\n[sink]\ntype = \"stdout\"\n");
    assert!(
        err.contains("oracle")
            && err.contains("postgres")
            && err.contains("sqlite")
            && err.contains("mysql"),
        "{err}"
    );
}

#[test]
fn out_of_range_values_name_the_key_and_range() {
    let err = error_of(&format!("{MINIMAL}[outbox]\npartitions = 0\n"));
    assert!(
        err.contains("outbox.partitions") && err.contains("4096"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[relay]\nbatch_size = 0\n"));
    assert!(err.contains("relay.batch_size"), "{err}");
    let err = error_of(&format!(
        "{MINIMAL}[outbox]\ntable_prefix = \"Bad-Prefix\"\n"
    ));
    assert!(err.contains("table_prefix"), "{err}");
}

const SERVICE: &str = "[service]\n[[service.tokens]]\nname = \"orders\"\ntoken = \"0123456789abcdef0123\"\nscopes = [\"producer\"]\n";

#[test]
fn service_section_is_optional_and_validated() {
    assert!(Config::from_toml(MINIMAL).expect("valid").service.is_none());
    let config = Config::from_toml(&format!("{MINIMAL}{SERVICE}")).expect("valid");
    assert_eq!(config.service.expect("present").max_deliveries, 5);
    let err = error_of(&format!(
        "{MINIMAL}{}",
        SERVICE.replace("[service]\n", "[service]\nmax_checks = 0\n")
    ));
    assert!(err.contains("service.max_checks"), "{err}");
    let err = error_of(&format!("{MINIMAL}[service]\nack_timeout = 5\n"));
    assert!(err.contains("ack_timeout"), "{err}");
    let err = error_of(&format!("{MINIMAL}{}", SERVICE.replace("producer", "root")));
    assert!(err.contains("root") && err.contains("consumer"), "{err}");
    let err = error_of(&format!(
        "{MINIMAL}[outbox]\nmax_payload_bytes = 100\n{SERVICE}"
    ));
    assert!(err.contains("service.max_payload_bytes"), "{err}");
}

#[test]
fn metrics_listen_is_optional_and_must_be_an_address() {
    let config = Config::from_toml(MINIMAL).expect("valid");
    assert_eq!(config.metrics.listen_addr().expect("valid"), None);
    let config = Config::from_toml(&format!(
        "{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9464\"\n"
    ))
    .expect("valid");
    assert_eq!(
        config.metrics.listen_addr().expect("valid"),
        Some("127.0.0.1:9464".parse().expect("address"))
    );
    let err = error_of(&format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n"));
    assert!(
        err.contains("metrics.listen") && err.contains("127.0.0.1:9464"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[metrics]\nport = 9464\n"));
    assert!(err.contains("port"), "{err}");
}

#[test]
fn an_enabled_dashboard_needs_a_listener_and_an_admin_token() {
    const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:9464\"\n";
    const ADMIN: &str = "[[dashboard.tokens]]\nname = \"operator\"\ntoken = \"operator-token-0123456789\"\nscopes = [\"admin\"]\n";
    let err = error_of(&format!("{MINIMAL}[dashboard]\nenabled = true\n{ADMIN}"));
    assert!(
        err.contains("nothing serves it") && err.contains("metrics.listen"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}{METRICS}[dashboard]\nenabled = true\n"));
    assert!(err.contains("[[dashboard.tokens]]"), "{err}");
    let err = error_of(&format!(
        "{MINIMAL}{METRICS}[dashboard]\nenabled = true\n{}",
        ADMIN.replace("admin", "consumer")
    ));
    assert!(
        err.contains("dashboard.tokens") && err.contains("admin scope"),
        "{err}"
    );
    let err = error_of(&format!(
        "{MINIMAL}{METRICS}[dashboard]\nenabled = true\n{}",
        ADMIN.replace("operator-token-0123456789", "short")
    ));
    assert!(err.contains("dashboard.tokens[0].token"), "{err}");
    let config = Config::from_toml(&format!(
        "{MINIMAL}{METRICS}[dashboard]\nenabled = true\n{ADMIN}"
    ))
    .expect("valid");
    let tokens = config.dashboard_tokens().expect("tokens");
    assert!(tokens.authenticate("operator-token-0123456789").is_some());
    // Without its own tokens, the dashboard takes the service's, which need an admin one.
    let config = Config::from_toml(&format!(
        "{MINIMAL}{}[dashboard]\nenabled = true\n",
        SERVICE.replace("producer", "admin")
    ))
    .expect("valid");
    assert!(config.dashboard_tokens().is_ok());
    let err = error_of(&format!("{MINIMAL}{SERVICE}[dashboard]\nenabled = true\n"));
    assert!(
        err.contains("service.tokens") && err.contains("admin scope"),
        "{err}"
    );
}

#[test]
fn leases_default_to_the_store_and_external_ones_are_checked() {
    let config = Config::from_toml(MINIMAL).expect("valid");
    assert!(!config.leases.is_external());
    assert!(!config.relay_config().external_leases);
    let config = Config::from_toml(&format!(
        "{MINIMAL}[leases]\ntype = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
    ))
    .expect("valid");
    assert!(config.relay_config().external_leases && config.store_settings().external_leases);
    for tls in [
        "type = \"redis\"\nurl = \"rediss://x:6380\"\ntls_ca_file = \"/etc/ca.pem\"",
        "type = \"etcd\"\nendpoints = [\"https://x:2379\"]\ntls_ca_file = \"/etc/ca.pem\"",
    ] {
        Config::from_toml(&format!("{MINIMAL}[leases]\n{tls}\n")).expect(tls);
    }
    for (leases, expected) in [
        ("type = \"zookeeper\"", "redis"),
        ("type = \"redis\"\nurl = \"http://x\"", "leases.url"),
        (
            "type = \"redis\"\nurl = \"redis://x\"\ntls_ca_file = \"/etc/ca.pem\"",
            "leases.tls_ca_file",
        ),
        (
            "type = \"etcd\"\nendpoints = [\"http://x\"]\ntls_ca_file = \"/etc/ca.pem\"",
            "leases.tls_ca_file",
        ),
        (
            "type = \"redis\"\nurl = \"redis://x\"\nkey_prefix = \"\"",
            "leases.key_prefix",
        ),
        ("type = \"etcd\"\nendpoints = []", "leases.endpoints"),
        (
            "type = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]",
            "http://",
        ),
        (
            "type = \"etcd\"\nendpoints = [\"http://x\"]\nusername = \"u\"",
            "leases.password",
        ),
        (
            "type = \"etcd\"\nendpoints = [\"http://x\"]\nurl = \"u\"",
            "url",
        ),
    ] {
        let err = error_of(&format!("{MINIMAL}[leases]\n{leases}\n"));
        assert!(err.contains(expected), "{leases}: {err}");
    }
}

#[test]
fn mqtt_and_webhook_settings_are_checked_with_the_key_named() {
    let sink = |text: &str| {
        error_of(&format!(
            "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n[sink]\n{text}\n"
        ))
    };
    let err = sink("type = \"mqtt\"\nqos = 0");
    assert!(err.contains("`qos`") && err.contains("lost"), "{err}");
    let err = sink("type = \"mqtt\"\ntopic_template = \"ferry/+/{aggregate_id}\"");
    assert!(
        err.contains("topic_template") && err.contains("wildcard"),
        "{err}"
    );
    let err = sink("type = \"mqtt\"\nurl = \"wss://broker:8883\"");
    assert!(err.contains("`url`") && err.contains("WebSockets"), "{err}");
    let err = sink("type = \"mqtt\"\nurl = \"mqtts://broker\"\ntls_ca_file = \"/nonexistent.pem\"");
    assert!(
        err.contains("`tls_ca_file`") && err.contains("/nonexistent.pem"),
        "{err}"
    );
    let err = sink("type = \"webhook\"\nurl = \"http://h/x\"\ntls_ca_file = \"/etc/ca.pem\"");
    assert!(
        err.contains("`tls_ca_file`") && err.contains("https://"),
        "{err}"
    );
    let err = sink("type = \"webhook\"");
    assert!(err.contains("`url`") && err.contains("required"), "{err}");
    let err = sink("type = \"webhook\"\nurl = \"ftp://h/x\"");
    assert!(err.contains("`url`") && err.contains("http"), "{err}");
    let err = sink("type = \"webhook\"\nurl = \"http://h/{aggregate}\"");
    assert!(
        err.contains("`url`") && err.contains("{aggregate_id}"),
        "{err}"
    );
    let err = sink("type = \"webhook\"\nurl = \"http://h/x\"\nsigning_secret = \"short\"");
    assert!(
        err.contains("signing_secret") && err.contains("too short"),
        "{err}"
    );
    assert!(
        !err.contains("short\""),
        "the secret itself is not echoed: {err}"
    );
}

#[test]
fn redis_and_amqp_sinks_are_validated_with_the_key_named() {
    let store = "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n";
    let cases = [
        ("type = \"redis_stream\"\nurl = \"http://x\"", "url"),
        (
            "type = \"redis_stream\"\nstream_template = \"orders\"",
            "{partition}",
        ),
        ("type = \"amqp\"\nurl = \"amqp://[::1\"", "url"),
        (
            "type = \"amqp\"\nrouting_key_template = \"{event}\"",
            "routing_key_template",
        ),
        (
            "type = \"amqp\"\n[sink.declare]\nexchange_type = \"fan\"",
            "declare.exchange_type",
        ),
    ];
    for (sink, expected) in cases {
        let err = error_of(&format!("{store}[sink]\n{sink}\n"));
        assert!(err.contains(expected), "{sink}: {err}");
    }
    let config = Config::from_toml(&format!(
        "{store}[sink]\ntype = \"redis_stream\"\nmax_len = 50000\n"
    ))
    .expect("valid");
    assert!(matches!(config.sink, SinkConfig::RedisStream(_)));
}

#[test]
fn redis_store_takes_a_key_prefix() {
    let redis =
        "[store]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n[sink]\ntype = \"stdout\"\n";
    let config = Config::from_toml(redis).expect("valid");
    let StoreConfig::Redis { key_prefix, .. } = &config.store else {
        panic!("a redis store")
    };
    assert_eq!(
        config.redis_settings(key_prefix).key_prefix.as_str(),
        "ferry:"
    );
    let err = error_of(&redis.replace("6379\"\n", "6379\"\nkey_prefix = \"bad prefix*\"\n"));
    assert!(err.contains("store.key_prefix"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let err = format!(
        "{:#}",
        Config::load(Path::new("/nonexistent/ferry.toml")).unwrap_err()
    );
    assert!(err.contains("/nonexistent/ferry.toml"), "{err}");
}

/// Environment overrides, set in a `figment::Jail` (nextest runs each test in a process of
/// its own, so no other test sees them).
#[test]
#[expect(
    clippy::result_large_err,
    reason = "figment::Jail's closure returns figment::Error"
)]
fn environment_overrides_apply_and_bad_ones_name_their_variable() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("FERRY_RELAY__BATCH_SIZE", "250");
        jail.set_env("FERRY_OUTBOX__TABLE_PREFIX", "app_");
        let config = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(config.relay.batch_size, 250);
        assert_eq!(config.outbox.table_prefix, "app_");

        jail.set_env("FERRY_RELAY__BATCH_SIZE", "many");
        let err = error_of(MINIMAL);
        assert!(
            err.contains("FERRY_RELAY__BATCH_SIZE") && !err.contains("many"),
            "{err}"
        );

        jail.set_env("FERRY_RELAY__BATCH_SIZE", "0");
        let err = error_of(MINIMAL);
        assert!(
            err.contains("relay.batch_size") && err.contains("FERRY_RELAY__BATCH_SIZE"),
            "{err}"
        );
        jail.clear_env();

        // A password that reads as a number: named, not shown, and the fix given.
        jail.set_env("FERRY_STORE__URL", "918273645");
        let err = error_of(
            "[store]\ntype = \"postgres\"\nurl = \"postgres://u@h/d\"\n[sink]\ntype = \"stdout\"\n",
        );
        assert!(
            err.contains("FERRY_STORE__URL") && !err.contains("918273645") && err.contains("quote"),
            "{err}"
        );
        jail.set_env("FERRY_STORE__URL", "\"postgres://u:918273645@h/d\"");
        Config::from_toml(
            "[store]\ntype = \"postgres\"\nurl = \"postgres://u@h/d\"\n[sink]\ntype = \"stdout\"\n",
        )
        .expect("a quoted value is text");
        jail.clear_env();

        jail.set_env("FERRY_RELAY__BATCH_SISE", "5");
        let err = error_of(MINIMAL);
        assert!(err.contains("batch_sise"), "{err}");
        Ok(())
    });
}

/// The configs under deploy/ (Kubernetes ConfigMap source) are valid too.
#[test]
fn deploy_configs_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/ferry.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    assert!(config.service.is_some_and(|s| !s.run_relay));
}

#[test]
fn wake_is_postgres_only_and_defaults_by_capture_mode() {
    const PG: &str =
        "[store]\ntype = \"postgres\"\nurl = \"postgres://h/db\"\n[sink]\ntype = \"stdout\"\n";
    let poll_ms = |config: &Config| config.relay_config().poll_interval.as_millis();
    let config = Config::from_toml(PG).expect("valid");
    assert_eq!(config.store_settings().wake, Wake::Notify);
    assert_eq!(poll_ms(&config), 1000);
    let config = Config::from_toml(&format!("{PG}[outbox]\nwake = \"poll\"\n")).expect("valid");
    assert_eq!(config.store_settings().wake, Wake::Poll);
    assert_eq!(poll_ms(&config), 100, "polling alone looks more often");
    let config = Config::from_toml(&format!(
        "{PG}[outbox]\nwake = \"poll\"\n[relay]\npoll_interval_ms = 20\n"
    ))
    .expect("valid");
    assert_eq!(poll_ms(&config), 20, "an explicit interval wins");
    let config = Config::from_toml(&format!("{PG}[capture]\nmode = \"log\"\n")).expect("valid");
    assert_eq!(
        config.store_settings().wake,
        Wake::Poll,
        "log mode never listens"
    );
    assert_eq!(poll_ms(&config), 1000, "log mode's interval is not a poll");
    let config = Config::from_toml(&format!(
        "{PG}[outbox]\nwake = \"notify\"\n[capture]\nmode = \"log\"\n"
    ))
    .expect("valid");
    assert_eq!(config.store_settings().wake, Wake::Notify);
    let err = error_of(&format!("{PG}[outbox]\nwake = \"listen\"\n"));
    assert!(err.contains("notify") && err.contains("poll"), "{err}");
    let err = error_of(&format!("{MINIMAL}[outbox]\nwake = \"poll\"\n"));
    assert!(
        err.contains("outbox.wake") && err.contains("PostgreSQL"),
        "{err}"
    );
    assert_eq!(
        poll_ms(&Config::from_toml(MINIMAL).expect("valid")),
        1000,
        "SQLite keeps its interval"
    );
}
