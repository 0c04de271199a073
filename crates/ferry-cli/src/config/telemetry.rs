//! `[tracing]`: exporting the relay's spans over OTLP.

use anyhow::bail;
use serde::Deserialize;
use url::Url;

/// Where the relay's spans go; nothing is exported unless `otlp_endpoint` is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSection {
    /// An OTLP/HTTP (protobuf) receiver, e.g. an OpenTelemetry Collector at
    /// `"http://127.0.0.1:4318"`; `/v1/traces` is added when the URL has no path, a URL with
    /// a path is used as it is. Unset by default: no export.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans are exported under. Defaults to `"ferry"`.
    pub service_name: String,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "ferry".into(),
        }
    }
}

/// The path OTLP/HTTP receivers take traces on.
const TRACES_PATH: &str = "/v1/traces";

impl TracingSection {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        self.traces_url()?;
        if self.service_name.trim().is_empty() {
            bail!("tracing.service_name must not be empty (leave it out for \"ferry\")");
        }
        Ok(())
    }

    /// The URL spans are posted to, if export is configured.
    pub fn traces_url(&self) -> anyhow::Result<Option<Url>> {
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(None);
        };
        let fix = "use the http(s) URL of an OTLP/HTTP receiver, e.g. \"http://127.0.0.1:4318\"";
        let mut url = match Url::parse(endpoint) {
            Ok(url) => url,
            Err(err) => bail!("tracing.otlp_endpoint = {endpoint:?} is not a URL ({err}): {fix}"),
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!("tracing.otlp_endpoint = {endpoint:?} is not an http(s) URL with a host: {fix}");
        }
        if url.path() == "/" {
            url.set_path(TRACES_PATH);
        }
        Ok(Some(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(endpoint: &str) -> TracingSection {
        TracingSection {
            otlp_endpoint: Some(endpoint.into()),
            ..TracingSection::default()
        }
    }

    #[test]
    fn the_traces_path_is_added_to_a_bare_endpoint() {
        let url = |endpoint| section(endpoint).traces_url().unwrap().unwrap().to_string();
        assert_eq!(
            url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("https://otel.example/custom/path"),
            "https://otel.example/custom/path"
        );
        assert!(TracingSection::default().traces_url().unwrap().is_none());
    }

    #[test]
    fn bad_endpoints_are_named() {
        for bad in [
            "collector:4318",
            "grpc://collector:4317",
            "not a url",
            "http://",
        ] {
            let err = section(bad).validate().unwrap_err().to_string();
            assert!(err.contains("tracing.otlp_endpoint"), "{bad}: {err}");
        }
    }
}
