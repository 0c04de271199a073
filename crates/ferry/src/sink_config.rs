//! What the broker sinks' settings share: the error that names a bad key, and the check
//! of the CloudEvents `source` every sink takes.

/// A sink setting that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {sink} sink setting `{key}`: {reason}")]
#[non_exhaustive]
pub struct InvalidSinkConfig {
    /// The sink's `type` in the config file (e.g. `redis_stream`).
    pub sink: &'static str,
    /// The config key, as written in the config file (e.g. `stream_template`).
    pub key: &'static str,
    /// What is wrong and what is allowed instead.
    pub reason: String,
}

impl InvalidSinkConfig {
    pub(crate) fn new(sink: &'static str, key: &'static str, reason: impl Into<String>) -> Self {
        Self {
            sink,
            key,
            reason: reason.into(),
        }
    }
}

/// Checks that the count `value` of `sink`'s setting `key` lies in `1..=max`.
pub(crate) fn check_count(
    sink: &'static str,
    key: &'static str,
    value: usize,
    max: usize,
    default: usize,
) -> Result<(), InvalidSinkConfig> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(InvalidSinkConfig::new(
            sink,
            key,
            format!("is {value}; allowed is 1 to {max} (default {default})"),
        ))
    }
}

/// Checks the optional CloudEvents `source` of sink `sink`.
pub(crate) fn check_source(
    sink: &'static str,
    source: Option<&str>,
) -> Result<(), InvalidSinkConfig> {
    match source {
        Some(source) if source.is_empty() || source.chars().any(char::is_control) => {
            Err(InvalidSinkConfig::new(
                sink,
                "source",
                "must be a non-empty URI without control characters (e.g. \"urn:shop:orders\"), \
                 or left unset for ferry://<aggregate_type>",
            ))
        }
        _ => Ok(()),
    }
}
