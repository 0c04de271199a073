//! Subject templates: `ferry.{aggregate_type}.{event_type}` rendered per message.
//!
//! The template is parsed once, at connect time, so rendering is a walk over prepared
//! segments with one allocation per message. Values are sanitised into single subject
//! tokens: a `.` inside an event type must not add a token (that would move the message
//! under other subscriptions), and `*`, `>` or whitespace would make the subject invalid.

use ferry_core::Message;

use crate::template::{Field, PLACEHOLDERS, Segment, Template};

/// A parsed `subject_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectTemplate {
    template: Template,
    /// One entry per subject token: its literal text, or `None` if a placeholder is in it.
    tokens: Vec<Option<Box<str>>>,
}

impl SubjectTemplate {
    /// Whether the template refers to `field`.
    pub(crate) fn uses(&self, field: Field) -> bool {
        self.template.uses(field)
    }

    /// Parses a template; the error says what is wrong and what is allowed.
    pub(crate) fn parse(template: &str) -> Result<Self, String> {
        let parsed = Template::parse(template)?;
        let tokens = literal_tokens(parsed.segments());
        let well_formed = !tokens.is_empty()
            && tokens.iter().all(|token| match token {
                Some(text) => !text.is_empty() && !text.contains(forbidden_in_token),
                None => true,
            });
        if !well_formed {
            return Err(format!(
                "{template:?} does not make a valid subject: use non-empty '.'-separated tokens \
                 without spaces or wildcards ('*', '>'), with placeholders {PLACEHOLDERS}, e.g. \
                 \"ferry.{{aggregate_type}}.{{event_type}}\""
            ));
        }
        Ok(Self {
            template: parsed,
            tokens,
        })
    }

    /// Whether some rendering of this template can match the stream subject `filter`
    /// (`*` and a final `>` being wildcards). A token with a placeholder can be anything,
    /// so this is false only when no message could ever be stored under `filter`.
    pub(crate) fn may_match(&self, filter: &str) -> bool {
        let mut tokens = self.tokens.iter();
        for wanted in filter.split('.') {
            if wanted == ">" {
                return tokens.next().is_some();
            }
            match tokens.next() {
                None => return false,
                Some(Some(literal)) if wanted != "*" && **literal != *wanted => return false,
                Some(_) => {}
            }
        }
        tokens.next().is_none()
    }

    /// The subject of `message`.
    pub(crate) fn render(&self, message: &Message) -> String {
        self.template.render(message, push_token)
    }
}

/// Splits the template into subject tokens, marking those that hold a placeholder.
fn literal_tokens(segments: &[Segment]) -> Vec<Option<Box<str>>> {
    let mut tokens: Vec<Option<String>> = vec![Some(String::new())];
    for segment in segments {
        match segment {
            Segment::Literal(text) => {
                for (i, part) in text.split('.').enumerate() {
                    if i > 0 {
                        tokens.push(Some(String::new()));
                    }
                    if let Some(Some(current)) = tokens.last_mut() {
                        current.push_str(part);
                    }
                }
            }
            Segment::Field(_) => {
                if let Some(last) = tokens.last_mut() {
                    *last = None;
                }
            }
        }
    }
    tokens
        .into_iter()
        .map(|token| token.map(String::into_boxed_str))
        .collect()
}

/// Characters NATS does not allow inside one subject token.
fn forbidden_in_token(c: char) -> bool {
    matches!(c, ' ' | '.' | '*' | '>') || c.is_control() || c.is_whitespace()
}

/// Appends `value` as one subject token: forbidden characters become `_`, and an empty
/// value becomes `_` so that no empty token (an invalid subject) is made.
pub(crate) fn push_token(subject: &mut String, value: &str) {
    if value.is_empty() {
        subject.push('_');
    } else if value
        .bytes()
        .all(|b| b > b' ' && b < 0x7f && !matches!(b, b'.' | b'*' | b'>'))
    {
        // The common case: plain ASCII, copied as is.
        subject.push_str(value);
    } else {
        subject.extend(
            value
                .chars()
                .map(|c| if forbidden_in_token(c) { '_' } else { c }),
        );
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    fn message(aggregate_type: &str, aggregate_id: &str, event_type: &str) -> Message {
        Message {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            version: 1,
            event_type: event_type.into(),
            payload: Bytes::new(),
            headers: Default::default(),
            partition_key: format!("{aggregate_type}/{aggregate_id}"),
            partition: 7,
            created_at: Utc::now(),
            sequence: 1,
        }
    }

    fn token(value: &str) -> String {
        let mut out = String::new();
        push_token(&mut out, value);
        out
    }

    #[test]
    fn renders_every_placeholder() {
        let template =
            SubjectTemplate::parse("ev.{aggregate_type}.{aggregate_id}.{event_type}.p{partition}")
                .expect("valid");
        let m = message("order", "42", "order.paid");
        assert_eq!(template.render(&m), "ev.order.42.order_paid.p7");
    }

    #[test]
    fn sanitises_tokens() {
        assert_eq!(token("plain-Token_1"), "plain-Token_1");
        assert_eq!(token("a.b"), "a_b");
        assert_eq!(token("a b\tc"), "a_b_c");
        assert_eq!(token("*>"), "__");
        assert_eq!(token("line\r\nbreak\u{7f}"), "line__break_");
        assert_eq!(token(""), "_");
        assert_eq!(token("zürich.ost"), "zürich_ost");
        assert_eq!(token("nbsp\u{a0}x"), "nbsp_x");
        let template =
            SubjectTemplate::parse("ferry.{aggregate_type}.{aggregate_id}").expect("valid");
        assert_eq!(template.render(&message("", "a.b>c", "x")), "ferry._.a_b_c");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "",
            "ferry.{nope}",
            "ferry.{aggregate_type",
            "ferry.aggregate_type}",
            "ferry..{event_type}",
            ".ferry.{event_type}",
            "ferry.{event_type}.",
            "ferry.*.{event_type}",
            "ferry.>",
            "fer ry.{event_type}",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
        let err = SubjectTemplate::parse("x.{aggregate}").expect_err("unknown");
        assert!(
            err.contains("{aggregate_type}") && err.contains("{partition}"),
            "{err}"
        );
    }

    #[test]
    fn matches_stream_subjects() {
        let template =
            SubjectTemplate::parse("ferry.{aggregate_type}.{event_type}").expect("valid");
        assert!(template.may_match("ferry.>"));
        assert!(template.may_match("ferry.*.*"));
        assert!(template.may_match("ferry.order.>"));
        assert!(template.may_match(">"));
        assert!(!template.may_match("ferry.*"));
        assert!(!template.may_match("ferry.*.*.*"));
        assert!(!template.may_match("orders.>"));
        let mixed = SubjectTemplate::parse("ferry.v1-{event_type}").expect("valid");
        assert!(mixed.may_match("ferry.anything"));
        assert!(!mixed.may_match("ferry"));
    }
}
