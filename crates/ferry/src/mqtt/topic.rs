//! Topic templates: `ferry/{aggregate_type}/{aggregate_id}` rendered per message.
//!
//! A publish topic must not hold the wildcards `+` and `#`, nor NUL; topics starting with
//! `$` belong to the broker. A value is rendered as (part of) one topic level, so a `/`
//! inside an aggregate id can never move the message under another subscription.

use ferry_core::Message;

use crate::template::{PLACEHOLDERS, Segment, Template};

/// Longest topic MQTT can carry (a UTF-8 string with a 16-bit length).
pub(crate) const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

/// A parsed `topic_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicTemplate {
    template: Template,
}

impl TopicTemplate {
    /// Parses a template; the error says what is wrong and what is allowed.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let template = Template::parse(text)?;
        if template.segments().is_empty() {
            return Err(format!(
                "is empty; use a topic such as \"ferry/{{aggregate_type}}/{{aggregate_id}}\" \
                 with placeholders {PLACEHOLDERS}"
            ));
        }
        let literal_has = |bad: fn(char) -> bool| {
            template.segments().iter().any(|segment| match segment {
                Segment::Literal(text) => text.contains(bad),
                Segment::Field(_) => false,
            })
        };
        if literal_has(|c| matches!(c, '+' | '#')) {
            return Err(format!(
                "{text:?} contains a wildcard ('+' or '#'), which a publish topic must not have; \
                 put a placeholder ({PLACEHOLDERS}) where the topic varies"
            ));
        }
        if literal_has(|c| c == '\0' || c.is_control()) {
            return Err(format!(
                "{text:?} contains a control character, which MQTT topics must not have"
            ));
        }
        if let Some(Segment::Literal(first)) = template.segments().first()
            && first.starts_with('$')
        {
            return Err(format!(
                "{text:?} starts with '$': such topics ($SYS/…) belong to the broker and \
                 clients cannot publish to them"
            ));
        }
        Ok(Self { template })
    }

    /// The topic of `message`.
    pub(crate) fn render(&self, message: &Message) -> String {
        self.template.render(message, push_level_text)
    }
}

/// Whether `c` must not appear in a value rendered into a topic level.
fn forbidden_in_level(c: char) -> bool {
    matches!(c, '/' | '+' | '#') || c.is_control()
}

/// Appends `value` as text within one topic level: `/`, `+`, `#` and control characters
/// become `_`, and an empty value becomes `_` so that no empty level is made.
fn push_level_text(topic: &mut String, value: &str) {
    if value.is_empty() {
        topic.push('_');
    } else if !value.contains(forbidden_in_level) {
        topic.push_str(value);
    } else {
        topic.extend(
            value
                .chars()
                .map(|c| if forbidden_in_level(c) { '_' } else { c }),
        );
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    fn message(aggregate_id: &str, event_type: &str) -> Message {
        Message {
            id: Uuid::now_v7(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            version: 1,
            event_type: event_type.into(),
            payload: Bytes::new(),
            headers: Default::default(),
            partition_key: format!("order/{aggregate_id}"),
            partition: 7,
            created_at: Utc::now(),
            sequence: 1,
        }
    }

    #[test]
    fn renders_values_inside_one_level() {
        let template =
            TopicTemplate::parse("ev/{aggregate_type}/{aggregate_id}/{event_type}/p{partition}")
                .expect("valid");
        assert_eq!(
            template.render(&message("42", "order.paid")),
            "ev/order/42/order.paid/p7"
        );
        assert_eq!(
            template.render(&message("a/b+c#", "")),
            "ev/order/a_b_c_/_/p7"
        );
        assert_eq!(
            template.render(&message("line\nbreak", "x")),
            "ev/order/line_break/x/p7"
        );
    }

    #[test]
    fn rejects_wildcards_and_broker_topics() {
        for bad in [
            "",
            "a/+/{aggregate_id}",
            "a/#",
            "a/b#",
            "$SYS/{event_type}",
            "a/{nope}",
            "a\0b",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
        let err = TopicTemplate::parse("a/+").expect_err("wildcard");
        assert!(err.contains("wildcard"), "{err}");
    }
}
