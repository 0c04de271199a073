//! Name templates shared by the sinks: `ferry.{aggregate_type}.{event_type}` (a NATS
//! subject, a Kafka topic), `ferry/{aggregate_type}/{aggregate_id}` (an MQTT topic),
//! `https://hooks.example/{aggregate_type}` (a webhook URL).
//!
//! A template is parsed once, when the sink is configured, into literal text and message
//! fields; each sink checks the literal text against its own syntax and renders the fields
//! with its own encoder (a NATS token, an MQTT topic level, a URL path segment), so that a
//! value can never change the shape of the name.

use std::fmt::Write as _;

use ferry_core::Message;

/// The placeholders a template may use, as written inside braces.
pub(crate) const PLACEHOLDERS: &str = "{aggregate_type}, {aggregate_id}, {event_type}, {partition}";

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

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(Box<str>),
    Field(Field),
}

/// A parsed template: literal text and placeholders, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
}

impl Template {
    /// Parses the braces and placeholder names; the error says what is wrong and which
    /// placeholders exist. Sinks check the literal text themselves.
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
        Ok(Self { segments })
    }

    /// Whether the template refers to `field`.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn uses(&self, field: Field) -> bool {
        self.segments.contains(&Segment::Field(field))
    }

    /// Whether the template has no placeholder (renders the same text for every message).
    #[cfg_attr(not(any(feature = "webhook", feature = "amqp")), allow(dead_code))]
    pub(crate) fn is_fixed(&self) -> bool {
        self.segments
            .iter()
            .all(|segment| matches!(segment, Segment::Literal(_)))
    }

    /// The literals and placeholders in order, for sinks that check the literal text.
    #[cfg_attr(
        not(any(
            feature = "nats",
            feature = "kafka",
            feature = "mqtt",
            feature = "redis-stream"
        )),
        allow(dead_code)
    )]
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Renders the template for `message`; `push_value` appends one field's value, made
    /// safe for the sink's names.
    pub(crate) fn render(
        &self,
        message: &Message,
        push_value: impl Fn(&mut String, &str),
    ) -> String {
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
        let mut name = String::with_capacity(capacity);
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => name.push_str(text),
                Segment::Field(Field::AggregateType) => {
                    push_value(&mut name, &message.aggregate_type)
                }
                Segment::Field(Field::AggregateId) => push_value(&mut name, &message.aggregate_id),
                Segment::Field(Field::EventType) => push_value(&mut name, &message.event_type),
                Segment::Field(Field::Partition) => {
                    // Writing into a String cannot fail.
                    let _ = write!(name, "{}", message.partition);
                }
            }
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_literals_and_fields() {
        let template = Template::parse("a{aggregate_type}/b{partition}").expect("valid");
        assert_eq!(
            template.segments(),
            [
                Segment::Literal("a".into()),
                Segment::Field(Field::AggregateType),
                Segment::Literal("/b".into()),
                Segment::Field(Field::Partition),
            ]
        );
        assert!(!template.is_fixed());
        assert!(Template::parse("plain").expect("valid").is_fixed());
    }

    #[test]
    fn names_bad_placeholders_and_braces() {
        for bad in ["x{nope}", "x{aggregate_type", "x}"] {
            let err = Template::parse(bad).expect_err(bad);
            assert!(err.contains(PLACEHOLDERS), "{err}");
        }
    }
}
