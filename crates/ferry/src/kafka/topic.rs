//! Topic templates: `ferry.{aggregate_type}` rendered per message into a Kafka topic name.
//!
//! Kafka topic names are 1 to 249 characters from `[a-zA-Z0-9._-]`, and neither `.` nor
//! `..`. Literal text is checked when the template is parsed; a placeholder's value has
//! every other character replaced with `_` (an empty value becomes `_`), so a message
//! field can never make an invalid name. Reconciliation finds the topics a template may
//! have written to with [`TopicTemplate::matches`].

use ferry_core::Message;

use crate::template::{Field, PLACEHOLDERS, Segment, Template};

/// Longest topic name Kafka accepts.
pub(crate) const MAX_TOPIC_LEN: usize = 249;

/// A parsed `topic_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicTemplate {
    template: Template,
}

impl TopicTemplate {
    /// Parses a template; the error says what is wrong and what is allowed.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let template = Template::parse(text)?;
        let mut literal_len = 0;
        let mut has_field = false;
        for segment in template.segments() {
            match segment {
                Segment::Literal(literal) => {
                    if let Some(bad) = literal.chars().find(|c| !is_topic_char(*c)) {
                        return Err(format!(
                            "{text:?} has the character {bad:?}, which Kafka topic names cannot \
                             hold: use letters, digits, '.', '_' and '-', with placeholders \
                             {PLACEHOLDERS}, e.g. \"ferry.{{aggregate_type}}\""
                        ));
                    }
                    literal_len += literal.len();
                }
                Segment::Field(_) => has_field = true,
            }
        }
        if literal_len == 0 && !has_field {
            return Err("is empty; use e.g. \"ferry.{aggregate_type}\"".into());
        }
        // A placeholder renders at least one character.
        if literal_len + usize::from(has_field) > MAX_TOPIC_LEN {
            return Err(format!(
                "{text:?} is too long: Kafka topic names have at most {MAX_TOPIC_LEN} characters"
            ));
        }
        if !has_field && matches!(text, "." | "..") {
            return Err(format!("{text:?} is not a valid Kafka topic name"));
        }
        Ok(Self { template })
    }

    /// The topic of `message`, or why it cannot be one (too long once rendered).
    pub(crate) fn render(&self, message: &Message) -> Result<String, String> {
        let topic = self.template.render(message, push_topic_part);
        if topic.len() > MAX_TOPIC_LEN {
            return Err(format!(
                "the topic rendered for this message is {} characters long; Kafka allows at most \
                 {MAX_TOPIC_LEN} (shorten topic_template or the field it takes)",
                topic.len()
            ));
        }
        if matches!(topic.as_str(), "." | "..") {
            return Err(format!(
                "the topic rendered for this message is {topic:?}, which Kafka refuses"
            ));
        }
        Ok(topic)
    }

    /// Whether `topic` is a name this template can render: literal text as is, each
    /// placeholder standing for one or more topic characters (digits for `{partition}`).
    pub(crate) fn matches(&self, topic: &str) -> bool {
        matches_from(self.template.segments(), topic)
    }
}

fn matches_from(segments: &[Segment], rest: &str) -> bool {
    match segments.split_first() {
        None => rest.is_empty(),
        Some((Segment::Literal(literal), others)) => rest
            .strip_prefix(&**literal)
            .is_some_and(|after| matches_from(others, after)),
        Some((Segment::Field(field), others)) => {
            let allowed = |c: char| match field {
                Field::Partition => c.is_ascii_digit(),
                _ => is_topic_char(c),
            };
            let run = rest.find(|c: char| !allowed(c)).unwrap_or(rest.len());
            // Every non-empty prefix of the run could be this placeholder's value.
            (1..=run).any(|len| matches_from(others, &rest[len..]))
        }
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Appends `value` as part of a topic name: characters Kafka refuses become `_`, and an
/// empty value becomes `_`.
fn push_topic_part(topic: &mut String, value: &str) {
    if value.is_empty() {
        topic.push('_');
    } else if value.chars().all(is_topic_char) {
        topic.push_str(value);
    } else {
        topic.extend(
            value
                .chars()
                .map(|c| if is_topic_char(c) { c } else { '_' }),
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

    #[test]
    fn renders_and_sanitises() {
        let template = TopicTemplate::parse("ferry.{aggregate_type}").expect("valid");
        assert_eq!(
            template.render(&message("order", "1", "x")),
            Ok("ferry.order".into())
        );
        assert_eq!(
            template.render(&message("zürich orders/2", "1", "x")),
            Ok("ferry.z_rich_orders_2".into())
        );
        assert_eq!(
            template.render(&message("", "1", "x")),
            Ok("ferry._".into())
        );
        let every =
            TopicTemplate::parse("{aggregate_type}.{event_type}.{aggregate_id}-p{partition}")
                .expect("valid");
        assert_eq!(
            every.render(&message("order", "42", "order.paid")),
            Ok("order.order.paid.42-p7".into())
        );
        let long = message(&"a".repeat(300), "1", "x");
        let err = template.render(&long).expect_err("too long");
        assert!(err.contains("249"), "{err}");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "",
            ".",
            "..",
            "ferry/{aggregate_type}",
            "fer ry",
            "ferry.{nope}",
            "ferry.{aggregate_type",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TopicTemplate::parse(&"a".repeat(250)).is_err());
        assert!(TopicTemplate::parse(&"a".repeat(249)).is_ok());
        assert!(TopicTemplate::parse(&format!("{}{{event_type}}", "a".repeat(249))).is_err());
        let err = TopicTemplate::parse("orders:{aggregate_type}").expect_err("colon");
        assert!(
            err.contains("':'") && err.contains("{aggregate_type}"),
            "{err}"
        );
    }

    #[test]
    fn matches_what_it_can_render() {
        let template = TopicTemplate::parse("ferry.{aggregate_type}").expect("valid");
        assert!(template.matches("ferry.order"));
        assert!(template.matches("ferry.order.paid"));
        assert!(!template.matches("ferry."));
        assert!(!template.matches("ferryx.order"));
        assert!(!template.matches("other.order"));
        let partitioned = TopicTemplate::parse("ev-{partition}-{aggregate_type}").expect("valid");
        assert!(partitioned.matches("ev-12-order"));
        assert!(partitioned.matches("ev-1-2-x"));
        assert!(!partitioned.matches("ev-x-order"));
        let fixed = TopicTemplate::parse("orders").expect("valid");
        assert!(fixed.matches("orders"));
        assert!(!fixed.matches("orders2"));
    }
}
