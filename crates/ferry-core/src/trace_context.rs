//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and
//! `tracestate` a producer hands to `enqueue`, kept in the message's headers and sent as
//! the CloudEvents distributed-tracing extension. Checked here, so that a malformed value
//! is refused at enqueue rather than dropped by a tracer downstream.

/// The header (and CloudEvents attribute) holding the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";

/// The header (and CloudEvents attribute) holding the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// A valid `traceparent`, split into its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// Two lowercase hex digits; `00` today.
    pub version: &'a str,
    /// 32 lowercase hex digits, not all zero: the trace every span of the request shares.
    pub trace_id: &'a str,
    /// 16 lowercase hex digits, not all zero: the producer's span.
    pub parent_id: &'a str,
    /// Two lowercase hex digits; bit 0 is "sampled".
    pub flags: &'a str,
}

impl<'a> TraceParent<'a> {
    /// Parses `version-traceid-parentid-flags`, saying what is wrong when it is not one.
    pub fn parse(value: &'a str) -> Result<Self, &'static str> {
        let mut fields = value.splitn(5, '-');
        let mut next = || fields.next().unwrap_or("");
        let (version, trace_id, parent_id, flags, rest) = (next(), next(), next(), next(), next());
        let hex = |field: &str, len: usize| {
            field.len() == len
                && field
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !(hex(version, 2) && hex(trace_id, 32) && hex(parent_id, 16) && hex(flags, 2)) {
            return Err(
                "it must be version-traceid-parentid-flags: 2, 32, 16 and 2 lowercase hex digits joined by '-'",
            );
        }
        if version == "ff" {
            return Err("version ff is forbidden");
        }
        if version == "00" && value.len() != 55 {
            return Err("a version 00 traceparent has exactly four fields");
        }
        if rest.is_empty() && value.len() > 55 {
            return Err("fields after the flags must follow a '-'");
        }
        if trace_id.bytes().all(|b| b == b'0') {
            return Err("the trace id must not be all zeros");
        }
        if parent_id.bytes().all(|b| b == b'0') {
            return Err("the parent id must not be all zeros");
        }
        Ok(Self {
            version,
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Whether the producer sampled its trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(self.flags, 16).is_ok_and(|flags| flags & 1 == 1)
    }
}

/// The most list members a `tracestate` may have.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Checks a `tracestate`: up to 32 comma-separated `key=value` members, keys of lowercase
/// letters, digits and `_-*/@`, values of printable ASCII without `,` and `=`.
pub fn check_tracestate(value: &str) -> Result<(), &'static str> {
    let members: Vec<&str> = value
        .split(',')
        .map(|member| member.trim_matches([' ', '\t']))
        .filter(|member| !member.is_empty())
        .collect();
    if members.len() > MAX_TRACESTATE_MEMBERS {
        return Err("it has more than 32 members");
    }
    for member in members {
        let Some((key, val)) = member.split_once('=') else {
            return Err("every member must be key=value");
        };
        let first = key.bytes().next().unwrap_or(b'_');
        let key_ok = key.len() <= 256
            && (first.is_ascii_lowercase() || first.is_ascii_digit())
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/@".contains(&b));
        if !key_ok {
            return Err(
                "a key must be lowercase letters, digits and _-*/@, starting with a letter or digit",
            );
        }
        let val_ok = (1..=256).contains(&val.len())
            && val
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
        if !val_ok {
            return Err(
                "a value must be 1 to 256 printable ASCII characters other than ',' and '='",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_splits_into_its_fields() {
        let parsed = TraceParent::parse(VALID).expect("valid");
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.parent_id, "00f067aa0ba902b7");
        assert!(parsed.sampled());
        assert!(
            !TraceParent::parse(&VALID.replace("-01", "-00"))
                .unwrap()
                .sampled()
        );
        // A later version may add fields after the flags.
        let future = format!("01{}-what-comes-next", &VALID[2..]);
        assert!(TraceParent::parse(&future).is_ok());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            &VALID.to_uppercase(),
            &VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &format!("ff{}", &VALID[2..]),
            &format!("{VALID}-extra"),
            &format!("01{}x", &VALID[2..]),
            &VALID[..54],
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tracestate_members_are_checked() {
        assert!(check_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").is_ok());
        assert!(check_tracestate("tenant@vendor=x , other=y").is_ok());
        for bad in ["novalue", "Upper=x", "k=a,b=", "k=v=w", &"k=v,".repeat(33)] {
            assert!(check_tracestate(bad).is_err(), "{bad:?}");
        }
    }
}
