//! Subject templates: `ferry.{aggregate_type}.{event_type}` rendered per message.
//!
//! The template is parsed once, at connect time, so rendering is a walk over prepared
//! segments with one allocation per message. Values are sanitised into single subject
//! tokens: a `.` inside an event type must not add a token (that would move the message
//! under other subscriptions), and `*`, `>` or whitespace would make the subject invalid.

use std::fmt::Write as _;

use ferry_core::Message;

/// The placeholders a template may use, as written inside braces.
const PLACEHOLDERS: &str = "{aggregate_type}, {aggregate_id}, {event_type}, {partition}";

/// A message field a template refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    AggregateType,
    AggregateId,
    EventType,
    Partition,
}

impl Field {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "aggregate_type" => Some(Self::AggregateType),
            "aggregate_id" => Some(Self::AggregateId),
            "event_type" => Some(Self::EventType),
            "partition" => Some(Self::Partition),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Field(Field),
}

/// A parsed `subject_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectTemplate {
    segments: Vec<Segment>,
    /// One entry per subject token: its literal text, or `None` if a placeholder is in it.
    tokens: Vec<Option<Box<str>>>,
}

impl SubjectTemplate {
    /// Parses a template; the error says what is wrong and what is allowed.
    pub(crate) fn parse(template: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(at) if rest.as_bytes()[at] == b'}' => {
                    return Err(format!(
                        "{template:?} has a '}}' without its '{{'; placeholders are {PLACEHOLDERS}"
                    ));
                }
                Some(at) => {
                    if at > 0 {
                        segments.push(Segment::Literal(rest[..at].into()));
                    }
                    let after = &rest[at + 1..];
                    let end = after.find('}').ok_or_else(|| {
                        format!(
                            "{template:?} has a '{{' without its '}}'; placeholders are {PLACEHOLDERS}"
                        )
                    })?;
                    let name = &after[..end];
                    let field = Field::parse(name).ok_or_else(|| {
                        format!(
                            "{template:?} uses the unknown placeholder {{{name}}}; allowed are {PLACEHOLDERS}"
                        )
                    })?;
                    segments.push(Segment::Field(field));
                    rest = &after[end + 1..];
                }
                None => {
                    segments.push(Segment::Literal(rest.into()));
                    rest = "";
                }
            }
        }
        let tokens = literal_tokens(&segments);
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
        Ok(Self { segments, tokens })
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

    /// Whether the template refers to `field`.
    pub(crate) fn uses(&self, field: Field) -> bool {
        self.segments.contains(&Segment::Field(field))
    }

    /// The subject of `message`.
    pub(crate) fn render(&self, message: &Message) -> String {
        let capacity = self
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Literal(text) => text.len(),
                Segment::Field(Field::AggregateType) => message.aggregate_type.len(),
                Segment::Field(Field::AggregateId) => message.aggregate_id.len(),
                Segment::Field(Field::EventType) => message.event_type.len(),
                Segment::Field(Field::Partition) => 10,
            })
            .sum::<usize>()
            .max(1);
        let mut subject = String::with_capacity(capacity);
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => subject.push_str(text),
                Segment::Field(Field::AggregateType) => {
                    push_token(&mut subject, &message.aggregate_type)
                }
                Segment::Field(Field::AggregateId) => {
                    push_token(&mut subject, &message.aggregate_id)
                }
                Segment::Field(Field::EventType) => push_token(&mut subject, &message.event_type),
                Segment::Field(Field::Partition) => {
                    // Writing into a String cannot fail.
                    let _ = write!(subject, "{}", message.partition);
                }
            }
        }
        subject
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
