//! Name templates such as `ferry.{aggregate_type}.{event_type}`, rendered per message into
//! a NATS subject, a Kafka topic or another sink's destination name.
//!
//! A template is parsed once, at connect time, into literal and placeholder segments; each
//! sink then checks the literals against its own naming rules and renders placeholders
//! through its own sanitiser, so that a message field can never make an invalid name.

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
    pub(crate) fn uses(&self, field: Field) -> bool {
        self.segments.contains(&Segment::Field(field))
    }

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
    fn parses_literals_and_placeholders() {
        let template = Template::parse("ev.{aggregate_type}-{partition}").expect("valid");
        assert_eq!(
            template.segments(),
            [
                Segment::Literal("ev.".into()),
                Segment::Field(Field::AggregateType),
                Segment::Literal("-".into()),
                Segment::Field(Field::Partition),
            ]
        );
    }

    #[test]
    fn brace_errors_name_the_placeholders() {
        for bad in ["x.{nope}", "x.{aggregate_type", "x.aggregate_type}"] {
            let err = Template::parse(bad).expect_err("refused");
            assert!(
                err.contains("{aggregate_type}") && err.contains("{partition}"),
                "{err}"
            );
        }
    }
}
