//! `FERRY_<SECTION>__<KEY>` environment overrides (`FERRY_STORE__URL`,
//! `FERRY_LEASES__PASSWORD`, `FERRY_SINK__DECLARE__EXCHANGE_TYPE`): one `__` between the
//! levels of a key, upper case. Values are read as TOML-like values, so a value that reads
//! as a number or boolean where text is expected must be quoted
//! (`FERRY_LEASES__PASSWORD='"123456"'`). Errors name the variable and never its value,
//! which may be a secret.

use figment::providers::Env;
use figment::{Error, error::Kind};

const PREFIX: &str = "FERRY_";
const SEPARATOR: &str = "__";

/// The provider of the overrides. Only section-qualified variables: `FERRY_TEST_…`,
/// `FERRY_LOG` and the like are not config.
pub(super) fn overrides() -> Env {
    Env::prefixed(PREFIX)
        .filter(|key| key.as_str().contains(SEPARATOR))
        .split(SEPARATOR)
}

/// The variable that sets the config key `path` (`["relay", "batch_size"]`).
fn variable(path: &[impl AsRef<str>]) -> String {
    let key: Vec<String> = path
        .iter()
        .map(|part| part.as_ref().to_ascii_uppercase())
        .collect();
    format!("{PREFIX}{}", key.join(SEPARATOR))
}

/// The override variables set in this process, with the dotted key each sets
/// (`FERRY_RELAY__BATCH_SIZE`, `relay.batch_size`).
fn set_variables() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter_map(|name| {
            let key = name.strip_prefix(PREFIX)?;
            key.contains(SEPARATOR)
                .then(|| key.to_ascii_lowercase().replace(SEPARATOR, "."))
                .map(|key| (name.clone(), key))
        })
        .collect()
}

/// The variables set under the config key `path`: errors inside a tagged section
/// (`[store]`, `[sink]`) only know the section, so every variable of it is a suspect.
fn variables_under(path: &[impl AsRef<str>]) -> String {
    let name = variable(path);
    let nested = format!("{name}{SEPARATOR}");
    let set: Vec<String> = set_variables()
        .into_iter()
        .map(|(variable, _)| variable)
        .filter(|variable| *variable == name || variable.starts_with(&nested))
        .collect();
    if set.is_empty() {
        name
    } else {
        set.join(" or ")
    }
}

/// One extraction error as the user reads it: with the variable's name when the value
/// came from the environment, and without the value itself.
pub(super) fn describe(error: &Error) -> String {
    let from_env = error
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    if !from_env {
        return error.to_string();
    }
    match &error.kind {
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
            let hint = if expected.contains("string") {
                "; quote a value that reads as a number or boolean, e.g. '\"123456\"'"
            } else {
                ""
            };
            format!(
                "environment variable {} is invalid (its value is not shown): expected {expected}{hint}",
                variables_under(&error.path)
            )
        }
        Kind::UnknownField(field, _) => {
            let mut path = error.path.clone();
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            format!(
                "environment variable {} sets an unknown key: {}",
                variable(&path),
                error.kind
            )
        }
        kind => format!(
            "environment variable {}: {kind}",
            variables_under(&error.path)
        ),
    }
}

/// Names the override variable behind a validation error about a key it sets, e.g.
/// "relay.batch_size = 0 is out of range … (set by FERRY_RELAY__BATCH_SIZE)".
pub(super) fn name_overrides_in(error: anyhow::Error) -> anyhow::Error {
    let message = format!("{error:#}");
    let named: Vec<String> = set_variables()
        .into_iter()
        .filter(|(_, key)| message.contains(key.as_str()))
        .map(|(name, _)| name)
        .collect();
    if named.is_empty() {
        error
    } else {
        error.context(format!("config as overridden by {}", named.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_named_from_key_paths() {
        assert_eq!(variable(&["store", "url"]), "FERRY_STORE__URL");
        assert_eq!(
            variable(&["sink", "declare", "exchange_type"]),
            "FERRY_SINK__DECLARE__EXCHANGE_TYPE"
        );
    }
}
