//! Webhook URL templates: `https://hooks.example.com/events/{aggregate_type}`.
//!
//! Placeholders may only follow the host, and their values are percent-encoded (all but
//! RFC 3986 unreserved characters), so a value can neither change the host nor add a
//! path segment or query parameter. A URL without placeholders is parsed once.

use url::Url;

use crate::template::{PLACEHOLDERS, Segment, Template};
use ferry_core::Message;

/// A parsed `url`.
#[derive(Debug, Clone)]
pub(crate) enum UrlTemplate {
    Fixed(Url),
    PerMessage(Template),
}

impl UrlTemplate {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        const EXAMPLE: &str = "e.g. \"https://hooks.example.com/events/{aggregate_type}\"";
        if text.trim().is_empty() {
            return Err(format!(
                "is required: the URL to POST each message to, {EXAMPLE}"
            ));
        }
        let template = Template::parse(text)?;
        let sample = template.render(&sample_message(), push_encoded);
        let url = Url::parse(&sample)
            .map_err(|err| format!("{text:?} is not a URL ({err}); {EXAMPLE}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{text:?} has the scheme {:?}; use http:// or https://",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{text:?} carries credentials; use `bearer_token` instead, so that they are never logged"
            ));
        }
        if url.fragment().is_some() {
            return Err(format!(
                "{text:?} has a #fragment, which is never sent to a server"
            ));
        }
        let literal_prefix = match template.segments().first() {
            Some(Segment::Literal(prefix)) => prefix.as_ref(),
            _ => "",
        };
        let has_fields = !template.is_fixed();
        let authority_end = literal_prefix.find("://").and_then(|at| {
            literal_prefix[at + 3..]
                .find(['/', '?'])
                .map(|end| at + 3 + end)
        });
        if has_fields && authority_end.is_none() {
            return Err(format!(
                "{text:?} has a placeholder in the scheme or host; placeholders ({PLACEHOLDERS}) \
                 may only appear after the host, in the path or query"
            ));
        }
        if url.as_str() != sample {
            return Err(format!(
                "{text:?} is not in normal form (the server would see {:?}); write it that way",
                url.as_str()
            ));
        }
        Ok(if has_fields {
            Self::PerMessage(template)
        } else {
            Self::Fixed(url)
        })
    }

    /// The URL of `message`; fails only when a value makes a URL the parser rewrites
    /// (an aggregate id of `..` would climb a path segment).
    pub(crate) fn render(&self, message: &Message) -> Result<Url, String> {
        match self {
            Self::Fixed(url) => Ok(url.clone()),
            Self::PerMessage(template) => {
                let text = template.render(message, push_encoded);
                let url =
                    Url::parse(&text).map_err(|err| format!("{text:?} is not a URL ({err})"))?;
                if url.as_str() == text {
                    Ok(url)
                } else {
                    Err(format!(
                        "the message's fields make the URL {text:?}, which a server would read as {:?}",
                        url.as_str()
                    ))
                }
            }
        }
    }
}

fn sample_message() -> Message {
    Message {
        id: uuid::Uuid::nil(),
        aggregate_type: "a".into(),
        aggregate_id: "1".into(),
        version: 1,
        event_type: "e".into(),
        payload: bytes::Bytes::new(),
        headers: Default::default(),
        partition_key: "a/1".into(),
        partition: 0,
        created_at: chrono::DateTime::UNIX_EPOCH,
        sequence: 1,
    }
}

/// Appends `value` percent-encoded: only RFC 3986 unreserved characters stay as they are.
fn push_encoded(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push('_');
        return;
    }
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(byte >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(byte & 15)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(aggregate_id: &str) -> Message {
        Message {
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "order.paid".into(),
            partition: 5,
            ..sample_message()
        }
    }

    #[test]
    fn values_are_encoded_inside_their_segment() {
        let template = UrlTemplate::parse(
            "https://h.example/e/{aggregate_type}/{aggregate_id}?type={event_type}&p={partition}",
        )
        .expect("valid");
        let url = template.render(&message("a/b?c=d&é")).expect("renders");
        assert_eq!(
            url.as_str(),
            "https://h.example/e/order/a%2Fb%3Fc%3Dd%26%C3%A9?type=order.paid&p=5"
        );
        assert!(
            template.render(&message("..")).is_err(),
            "'..' climbs a segment"
        );
    }

    #[test]
    fn fixed_urls_are_parsed_once() {
        let template = UrlTemplate::parse("http://127.0.0.1:8080/hook").expect("valid");
        assert!(matches!(template, UrlTemplate::Fixed(_)));
        assert_eq!(
            template.render(&message("x")).expect("fixed").as_str(),
            "http://127.0.0.1:8080/hook"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "",
            "hooks.example.com/x",
            "ftp://h/x",
            "https://user:pw@h/x",
            "https://h/x#frag",
            "https://{aggregate_type}.example.com/x",
            "https://h{partition}/x",
            "https://h/{nope}",
            "http://h",
            "https://h/a/../b",
        ] {
            assert!(UrlTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
